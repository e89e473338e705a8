// Without MPI_Init: hma must say so instead of crashing inside MPI. Run without mpirun.
#define CATCH_CONFIG_MAIN
#include <mpi.h>

#include <catch2/catch.hpp>

#include <string>

#include "hma/hma.hpp"

TEST_CASE("creating an averager or a hierarchy before MPI_Init throws a clear hma::Error") {
  using Catch::Contains;
  REQUIRE_THROWS_WITH(hma::PeriodicAverager(MPI_COMM_WORLD, 2, 0),
                      Contains("averager: MPI is not initialised; call MPI_Init"));
  REQUIRE_THROWS_WITH(hma::HierarchicalAverager(MPI_COMM_WORLD, "2:2,4:4", 0),
                      Contains("MPI is not initialised"));
  REQUIRE_THROWS_WITH(hma::Averager(MPI_COMM_WORLD, hma::Schedule::periodic(2, 0, 4)),
                      Contains("MPI is not initialised"));
  const int sizes[] = {2};
  REQUIRE_THROWS_WITH(hma::Hierarchy(MPI_COMM_WORLD, sizes), Contains("Hierarchy: MPI is not initialised"));
  REQUIRE_THROWS_AS(hma::PeriodicAverager(MPI_COMM_WORLD, 2, 0), hma::Error);
  // The pure parts work without MPI.
  REQUIRE(hma::Schedule::parse("2:2,4:4", 0, 4).level_at(4) == 1u);
  hma::ParamSet ps;
  REQUIRE(ps.allocate<float>(3).size() == 3);
}

TEST_CASE("the library's version is the headers' and the project's") {
  REQUIRE(std::string(hma::version()) == HMA_VERSION_STRING);
  REQUIRE(std::string(hma::version()) == HMA_PROJECT_VERSION);
}
