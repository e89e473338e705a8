// ParamSet::add for the caller's arrays in every form it takes: a pointer and a length, a
// std::span, a std::vector, a std::array, a C array, any contiguous range, and random-access
// ranges with data() (an Eigen 3.4 vector, when Eigen is found: HMA_TEST_HAVE_EIGEN). Each form
// is averaged at the world level and every element compared with the mean computed here from
// the rank count (the values are integers: every sum is exact, in bf16 and fp16 too). Strided
// ranges are refused at run time, const ranges and owning temporaries at compile time.
#include <array>
#include <cstddef>
#include <iterator>
#include <span>
#include <vector>

#include "hma/hma.hpp"
#include "mpi_test.hpp"

#ifdef HMA_TEST_HAVE_EIGEN
#include <Eigen/Dense>
#endif

using hma_test::rank;
using hma_test::size;

namespace {

// What add() accepts, as a value the test checks at run time (a mutant that loosens a
// constraint still compiles, and this test then fails).
template <class A>
concept can_add = requires(hma::ParamSet& p, A&& a) { p.add(std::forward<A>(a)); };
template <class P>
concept can_add_ptr = requires(hma::ParamSet& s, P p) { s.add(p, std::size_t{3}); };

// Element i of array k on rank r: size * (r + j + k) with j = i % 16, so the mean over ranks is
// sum_r (r + j + k) = size * (j + k) + size * (size - 1) / 2, an integer below 256 at up to 8
// ranks (bf16 holds it exactly).
double value(int r, std::size_t i, int k) {
  return size() * (r + static_cast<double>(i % 16) + k);
}
double mean(std::size_t i, int k) {
  const double n = size();
  return n * (static_cast<double>(i % 16) + k) + n * (n - 1) / 2;
}

template <class T>
T make(double x) {
  if constexpr (hma::Half<T>) return T::from(static_cast<float>(x));
  else return static_cast<T>(x);
}
template <class T>
double as_double(T x) {
  if constexpr (hma::Half<T>) return x.to_float();
  else return static_cast<double>(x);
}

template <class T>
void fill(T* p, std::size_t n, int k) {
  for (std::size_t i = 0; i < n; ++i) p[i] = make<T>(value(rank(), i, k));
}
// The first element that differs from the mean, or -1.
template <class T>
long first_wrong(const T* p, std::size_t n, int k) {
  for (std::size_t i = 0; i < n; ++i)
    if (as_double(p[i]) != mean(i, k)) return static_cast<long>(i);
  return -1;
}

// A random-access range over p[0..n) in order whose iterators are not contiguous ones (a
// reverse of a reverse), with data(): the shape of an Eigen vector.
struct InOrder {
  float* p;
  std::size_t n;
  using It = std::reverse_iterator<std::reverse_iterator<float*>>;
  It begin() const { return It(std::reverse_iterator<float*>(p)); }
  It end() const { return It(std::reverse_iterator<float*>(p + n)); }
  float* data() const { return p; }
  std::size_t size() const { return n; }
};
// The same elements backwards: data() is the lowest address, element 0 the highest.
struct Backwards {
  float* p;
  std::size_t n;
  std::reverse_iterator<float*> begin() const { return std::reverse_iterator<float*>(p + n); }
  std::reverse_iterator<float*> end() const { return std::reverse_iterator<float*>(p); }
  float* data() const { return p; }
  std::size_t size() const { return n; }
};

template <class T>
void every_form_of(const char* dtype) {
  CAPTURE(dtype);
  constexpr std::size_t n = 7;
  std::vector<T> from_ptr(n), from_vector(n), from_span(n);
  std::array<T, n> from_array{};
  T from_c_array[n];
  std::vector<T> big(1000);
  fill(from_ptr.data(), n, 0);
  fill(from_vector.data(), n, 1);
  fill(from_span.data(), n, 2);
  fill(from_array.data(), n, 3);
  fill(from_c_array, n, 4);
  fill(big.data(), big.size(), 5);
  hma::ParamSet ps;
  ps.add(from_ptr.data(), n);
  ps.add(from_vector);
  ps.add(std::span<T>(from_span));  // a temporary view: its elements live on
  ps.add(from_array);
  ps.add(from_c_array);
  ps.add(big.data() + 10, 990);     // part of an array: the rest stays untouched
  ps.add(big.data(), 0);            // nothing
  REQUIRE_ALL_RANKS(ps.arrays() == 7);
  REQUIRE_ALL_RANKS(ps.count(hma::dtype_of<T>()) == 5 * n + 990);
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  REQUIRE_ALL_RANKS(avg.step(ps));
  REQUIRE_ALL_RANKS(first_wrong(from_ptr.data(), n, 0) == -1);
  REQUIRE_ALL_RANKS(first_wrong(from_vector.data(), n, 1) == -1);
  REQUIRE_ALL_RANKS(first_wrong(from_span.data(), n, 2) == -1);
  REQUIRE_ALL_RANKS(first_wrong(from_array.data(), n, 3) == -1);
  REQUIRE_ALL_RANKS(first_wrong(from_c_array, n, 4) == -1);
  bool head_untouched = true;
  for (std::size_t i = 0; i < 10; ++i) head_untouched = head_untouched && as_double(big[i]) == value(rank(), i, 5);
  REQUIRE_ALL_RANKS(head_untouched);
  long wrong = -1;
  for (std::size_t i = 10; i < big.size() && wrong < 0; ++i)
    if (as_double(big[i]) != mean(i, 5)) wrong = static_cast<long>(i);
  REQUIRE_ALL_RANKS(wrong == -1);
}

}  // namespace

TEST_CASE("add(ptr, n), spans, vectors, std::array and C arrays average to the mean, every dtype") {
  every_form_of<float>("f32");
  every_form_of<double>("f64");
  every_form_of<hma::bf16>("bf16");
  every_form_of<hma::fp16>("fp16");
}

TEST_CASE("a random-access range with data() is averaged when in order, refused when not") {
  std::vector<float> a(9), b(9);
  fill(a.data(), a.size(), 1);
  fill(b.data(), b.size(), 2);
  hma::ParamSet ps;
  InOrder in_order{a.data(), a.size()};
  ps.add(in_order);
  Backwards backwards{b.data(), b.size()};
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, ps.add(backwards),
                           "the range (9 elements) is not contiguous: element 0 does not lie at data() + 0");
  REQUIRE_ALL_RANKS(ps.arrays() == 1);
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  REQUIRE_ALL_RANKS(avg.step(ps));
  REQUIRE_ALL_RANKS(first_wrong(a.data(), a.size(), 1) == -1);
}

TEST_CASE("a null pointer with elements is refused; const ranges and owning temporaries do not compile") {
  hma::ParamSet ps;
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, ps.add(static_cast<double*>(nullptr), 3),
                           "the array has a null data pointer but a non-zero size");
  ps.add(static_cast<double*>(nullptr), 0);  // an empty array may have no storage
  REQUIRE_ALL_RANKS(ps.arrays() == 1);
  // Accepted: writable lvalues and non-owning views.
  REQUIRE_ALL_RANKS((can_add<std::array<float, 3>&>));
  REQUIRE_ALL_RANKS(can_add<std::vector<double>&>);
  REQUIRE_ALL_RANKS(can_add<std::span<float>>);
  REQUIRE_ALL_RANKS((can_add<std::span<hma::bf16, 4>>));
  REQUIRE_ALL_RANKS(can_add<float (&)[4]>);
  REQUIRE_ALL_RANKS(can_add<InOrder&>);
  // Refused: const elements (hma writes the average back) ...
  REQUIRE_ALL_RANKS((!can_add<const std::array<float, 3>&>));
  REQUIRE_ALL_RANKS(!can_add<const std::vector<double>&>);
  REQUIRE_ALL_RANKS(!can_add<std::span<const float>>);
  REQUIRE_ALL_RANKS(!can_add<const float (&)[4]>);
  REQUIRE_ALL_RANKS(can_add_ptr<float*>);
  REQUIRE_ALL_RANKS(!can_add_ptr<const float*>);
  // ... temporaries that own their elements (hma would keep a dangling address) ...
  REQUIRE_ALL_RANKS((!can_add<std::array<float, 3>>));
  REQUIRE_ALL_RANKS(!can_add<std::vector<double>>);
  // ... and element types hma does not average.
  REQUIRE_ALL_RANKS(!can_add<std::vector<int>&>);
  REQUIRE_ALL_RANKS((!can_add<std::array<long double, 2>&>));
}

#ifdef HMA_TEST_HAVE_EIGEN
TEST_CASE("Eigen vectors, maps and segments average to the mean; a matrix row is refused") {
  Eigen::VectorXf v(6);
  Eigen::VectorXd w(5);
  std::vector<float> mapped(4);
  for (Eigen::Index i = 0; i < v.size(); ++i) v[i] = static_cast<float>(value(rank(), i, 1));
  for (Eigen::Index i = 0; i < w.size(); ++i) w[i] = value(rank(), i, 2);
  fill(mapped.data(), mapped.size(), 3);
  Eigen::Map<Eigen::VectorXf> map(mapped.data(), 4);
  Eigen::MatrixXf m = Eigen::MatrixXf::Constant(3, 4, 1.0f);
  Eigen::VectorXd u = Eigen::VectorXd::Zero(8);
  for (Eigen::Index i = 0; i < u.size(); ++i) u[i] = value(rank(), i, 4);
  auto middle = u.segment(2, 4);  // u[2..5]
  auto row = m.row(1);            // strided: column-major storage
  hma::ParamSet ps;
  ps.add(v);
  ps.add(w);
  ps.add(map);
  ps.add(middle);
  REQUIRE_THROWS_ALL_RANKS(hma::InvalidArgument, ps.add(row), "element 1 does not lie at data() + 1");
  REQUIRE_ALL_RANKS(!can_add<const Eigen::VectorXf&>);
  REQUIRE_ALL_RANKS(!can_add<Eigen::VectorXf>);
  hma::PeriodicAverager avg(MPI_COMM_WORLD, 1);
  REQUIRE_ALL_RANKS(avg.step(ps));
  REQUIRE_ALL_RANKS(first_wrong(v.data(), 6, 1) == -1);
  REQUIRE_ALL_RANKS(first_wrong(w.data(), 5, 2) == -1);
  REQUIRE_ALL_RANKS(first_wrong(mapped.data(), 4, 3) == -1);
  bool segment_ok = true;
  for (Eigen::Index i = 0; i < u.size(); ++i) {
    const double want = i >= 2 && i < 6 ? mean(i, 4) : value(rank(), i, 4);
    segment_ok = segment_ok && u[i] == want;
  }
  REQUIRE_ALL_RANKS(segment_ok);
}
#endif
