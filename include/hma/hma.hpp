// hma/hma.hpp: hierarchical model averaging over MPI. Include this one header.
//
//   hma::ParamSet params;
//   auto w = params.allocate<float>(n);                 // zero-copy array, or params.add(span)
//   hma::HierarchicalAverager avg(MPI_COMM_WORLD, "2:node,8:world");
//   for (...) { compute(w.span()); avg.step(params); }   // or: auto r = avg.start(params); r.wait();
#pragma once

#include "hma/averager.hpp"
#include "hma/buffer.hpp"
#include "hma/comm.hpp"
#include "hma/device.hpp"
#include "hma/error.hpp"
#include "hma/hierarchy.hpp"
#include "hma/local_device.hpp"
#include "hma/schedule.hpp"
#include "hma/version.hpp"
