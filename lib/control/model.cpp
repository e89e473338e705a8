#include "control/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>

#include "hma/error.hpp"

namespace hma::detail {

namespace {

double log2_steps(int n) { return n <= 1 ? 0.0 : std::ceil(std::log2(static_cast<double>(n))); }

double across_fraction(int nodes) { return 2.0 * (nodes - 1) / nodes; }

}  // namespace

double predict_node_us(const LinkModel& m, int per_node, double bytes) {
  if (per_node <= 1) return 0;
  return m.intra_alpha_us + bytes / m.intra_bytes_per_s * 1e6;
}

double predict_flat_us(const LinkModel& m, Shape s, double bytes) {
  return 2 * log2_steps(s.nodes) * m.inter_alpha_us +
         across_fraction(s.nodes) * bytes / m.flat_bytes_per_s * 1e6 + predict_node_us(m, s.per_node, bytes);
}

double predict_across_us(const LinkModel& m, Shape s, double c, Across a) {
  const int N = s.nodes;
  if (a == Across::split && N % 2 == 0) {
    if (N == 2) return 2 * m.inter_alpha_us + c / m.inter_bytes_per_s * 1e6;
    return 4.0 * (N - 1) * m.inter_alpha_us + across_fraction(N) * c / m.inter_bytes_per_s * 1e6;
  }
  return 2 * log2_steps(N) * m.inter_alpha_us +
         across_fraction(N) * c / (m.inter_bytes_per_s * m.inter_duplex) * 1e6;
}

Across best_across(const LinkModel& m, Shape s, double c) {
  if (s.nodes % 2 != 0) return Across::mpi;
  return predict_across_us(m, s, c, Across::split) <= predict_across_us(m, s, c, Across::mpi) ? Across::split
                                                                                               : Across::mpi;
}

std::size_t split_min_piece(const LinkModel& m, Shape s) {
  if (s.nodes % 2 != 0) return SIZE_MAX;
  std::size_t c = std::size_t{64} << 10;
  c *= static_cast<std::size_t>(std::max(1, s.per_node));
  for (; c < (std::size_t{1} << 40); c += c / 8)
    if (best_across(m, s, static_cast<double>(c)) == Across::split) return c;
  return SIZE_MAX;
}

double predict_two_level_us(const LinkModel& m, Shape s, double bytes, std::size_t chunk_bytes) {
  if (bytes <= 0) return 0;
  const double c = std::min(bytes, static_cast<double>(two_level_piece_bytes(static_cast<std::size_t>(bytes), chunk_bytes)));
  const double pieces = std::ceil(bytes / c);
  // The transport's rule (two_level.cpp): the split from split_min_piece() on, which keeps the
  // 64 KiB-per-rank floor.
  const Across way = c >= static_cast<double>(split_min_piece(m, s)) ? Across::split : Across::mpi;
  const double across = predict_across_us(m, s, c, way);
  const double node = predict_node_us(m, s.per_node, c);
  return node + pieces * std::max(across, node);
}

std::size_t two_level_piece_bytes(std::size_t bytes, std::size_t chunk_bytes) {
  // At least four pieces where that keeps them >= 256 KiB, so that small averages pipeline too.
  const std::size_t quarter = std::max(bytes / 4, std::size_t{256} << 10);
  return std::min({chunk_bytes == 0 ? quarter : chunk_bytes, std::size_t{1} << 20, quarter});
}

std::string format_bytes(std::size_t b) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (u < 4 && b >= 1024 && b % 1024 == 0) {
    b /= 1024;
    ++u;
  }
  return std::to_string(b) + " " + unit[u];
}

double device_direct_from(const std::vector<double>& sizes, const std::vector<double>& staged_us,
                          const std::vector<double>& direct_us) {
  if (sizes.size() != staged_us.size() || sizes.size() != direct_us.size())
    throw InvalidArgument("hma: device_direct_from: one time of each path per size");
  double from = 0;
  for (std::size_t i = sizes.size(); i-- > 0;) {
    if (i + 1 < sizes.size() && !(sizes[i] < sizes[i + 1]))
      throw InvalidArgument("hma: device_direct_from: sizes must ascend");
    if (!(direct_us[i] < staged_us[i])) break;
    from = sizes[i];
  }
  return from;
}

LinkModel read_link_model(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InvalidArgument("hma: HMA_MODEL: cannot read the calibration file " + path);
  LinkModel m;
  std::string line;
  std::set<std::string> seen;
  int no = 0;
  while (std::getline(in, line)) {
    ++no;
    const auto hash = line.find('#');
    if (hash != std::string::npos) line.erase(hash);
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::istringstream ls(line);
    std::string key, eq;
    double v = 0;
    std::string rest;
    if (!(ls >> key >> eq >> v) || eq != "=" || !(v > 0) || !std::isfinite(v) || (ls >> rest))
      throw InvalidArgument("hma: HMA_MODEL " + path + " line " + std::to_string(no) +
                            ": expected `key = positive number`, got `" + line + "`");
    if (!seen.insert(key).second)
      throw InvalidArgument("hma: HMA_MODEL " + path + " line " + std::to_string(no) + ": `" + key +
                            "` given twice");
    if (key == "inter_duplex" && v > 1)
      throw InvalidArgument("hma: HMA_MODEL " + path + " line " + std::to_string(no) +
                            ": inter_duplex is a fraction of the one-way rate (0 < d <= 1), got `" + line + "`");
    if (key == "inter_alpha_us") m.inter_alpha_us = v;
    else if (key == "inter_bytes_per_s") m.inter_bytes_per_s = v;
    else if (key == "inter_duplex") m.inter_duplex = v;
    else if (key == "intra_alpha_us") m.intra_alpha_us = v;
    else if (key == "intra_bytes_per_s") m.intra_bytes_per_s = v;
    else if (key == "flat_bytes_per_s") m.flat_bytes_per_s = v;
    else if (key == "device_direct_from_bytes") m.device_direct_from_bytes = v;
    else
      throw InvalidArgument("hma: HMA_MODEL " + path + " line " + std::to_string(no) + ": unknown key `" +
                            key + "`");
  }
  return m;
}

std::string format_link_model(const LinkModel& m) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "inter_alpha_us = %.6g\ninter_bytes_per_s = %.6g\ninter_duplex = %.6g\n"
                "intra_alpha_us = %.6g\nintra_bytes_per_s = %.6g\nflat_bytes_per_s = %.6g\n",
                m.inter_alpha_us, m.inter_bytes_per_s, m.inter_duplex, m.intra_alpha_us,
                m.intra_bytes_per_s, m.flat_bytes_per_s);
  std::string t = buf;
  if (m.device_direct_from_bytes > 0) {
    std::snprintf(buf, sizeof buf, "device_direct_from_bytes = %.17g\n", m.device_direct_from_bytes);
    t += buf;
  }
  return t;
}

}  // namespace hma::detail
