/* The C API (hma/hma.h) from C: values after blocking, non-blocking and level averages (exact:
 * order-proof data), zero-copy and packed arrays, every error kind as a status with its message
 * on every rank, the text protocol, checkpoints, options. Every check is agreed across ranks
 * (check()); a failure names the rank, the line and hma_last_error(), then ends the job.
 * Run at np 1, 2, 3 and 4 (test/meson.build). */
#include <hma/hma.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank_, size_;

static void check_at(int ok, const char* what, int line) {
  int all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (all) return;
  if (!ok) fprintf(stderr, "test_capi.c:%d: rank %d: FAILED: %s (last error: %s)\n", line, rank_, what, hma_last_error());
  fflush(stderr);
  MPI_Barrier(MPI_COMM_WORLD);
  MPI_Abort(MPI_COMM_WORLD, 1);
}
#define check(cond) check_at((cond) ? 1 : 0, #cond, __LINE__)

/* A multiple of 6 in [-48, 48]: x / g exact for g in 1..4 and 6, every partial sum exact. */
static double value(int r, int t, int i) { return 6.0 * ((r * 7 + i * 3 + t * 5) % 17 - 8); }
static double mean(int g, int t, int i) {
  const int first = rank_ / g * g;
  double s = 0;
  for (int m = first; m < first + g; ++m) s += value(m, t, i);
  return s / g;
}

enum { N = 37, M = 11 };

static void values_and_modes(void) {
  hma_paramset ps = NULL;
  double user[N];
  float* owned = NULL;
  size_t index = 99, n = 0;
  check(hma_paramset_create(&ps) == HMA_OK && ps != NULL);
  check(hma_paramset_add_double(ps, user, N) == HMA_OK);
  check(hma_paramset_allocate_float(ps, M, &owned, &index) == HMA_OK && owned != NULL && index == 0);
  float* again = NULL;
  check(hma_paramset_array_float(ps, 0, &again, &n) == HMA_OK && again == owned && n == M);
  check(hma_paramset_array_double(ps, 0, NULL, NULL) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "is not a double array") != NULL);

  /* Hierarchical: groups of 1 every 2 steps, the world every 4 (torch: the largest period wins). */
  hma_averager avg = NULL;
  hma_options o;
  hma_options_init(&o);
  o.reduction = HMA_REDUCTION_MPI;
  check(hma_averager_create(MPI_COMM_WORLD, "2:1,4:world", 0, &o, &avg) == HMA_OK && avg != NULL);
  for (int t = 0; t < 9; ++t) {
    for (int i = 0; i < N; ++i) user[i] = value(rank_, t, i);
    for (int i = 0; i < M; ++i) owned[i] = (float)value(rank_, t, N + i);
    int level = -2, averaged = -1;
    check(hma_level_now(avg, &level) == HMA_OK);
    const int want_level = t % 4 == 0 ? 1 : t % 2 == 0 ? 0 : -1;
    check(level == want_level);
    if (t % 3 == 1) { /* non-blocking */
      hma_request req = NULL;
      int done = 0, lvl = -2;
      check(hma_start(avg, ps, &req) == HMA_OK && req != NULL);
      check(hma_request_level(req, &lvl) == HMA_OK && lvl == want_level);
      int tested = HMA_OK; /* ranks loop different numbers of times: check once after */
      while (!done && tested == HMA_OK) tested = hma_request_test(req, &done);
      check(tested == HMA_OK);
      check(hma_request_wait(req) == HMA_OK); /* again: a no-op */
      check(hma_request_free(&req) == HMA_OK && req == NULL);
      averaged = want_level >= 0;
    } else {
      check(hma_step(avg, ps, &averaged) == HMA_OK);
    }
    check(averaged == (want_level >= 0));
    const int g = want_level == 1 ? size_ : 1;
    int bad = 0;
    for (int i = 0; i < N; ++i) bad += user[i] != mean(g, t, i);
    for (int i = 0; i < M; ++i) bad += owned[i] != (float)mean(g, t, N + i);
    check(bad == 0);
  }
  int64_t step = -1;
  check(hma_step_count(avg, &step) == HMA_OK && step == 9);

  /* A level now, outside the schedule, blocking and started. */
  for (int i = 0; i < N; ++i) user[i] = value(rank_, 20, i);
  check(hma_average(avg, ps, 1) == HMA_OK);
  int bad = 0;
  for (int i = 0; i < N; ++i) bad += user[i] != mean(size_, 20, i);
  check(bad == 0);
  hma_request req = NULL;
  for (int i = 0; i < N; ++i) user[i] = value(rank_, 21, i);
  check(hma_start_average(avg, ps, 1, &req) == HMA_OK);
  check(hma_request_free(&req) == HMA_OK); /* free waits */
  for (int i = 0; i < N; ++i) bad += user[i] != mean(size_, 21, i);
  check(bad == 0);
  check(hma_average(avg, ps, 7) == HMA_ERR_INVALID_ARGUMENT && strstr(hma_last_error(), "level 7 out of range"));

  /* Text: size query, too small, exact. */
  size_t need = 0;
  check(hma_describe(avg, NULL, 0, &need) == HMA_OK && need > 20);
  char small[8];
  check(hma_describe(avg, small, sizeof small, NULL) == HMA_ERR && strlen(small) == 7);
  char* text = malloc(need);
  check(hma_describe(avg, text, need, NULL) == HMA_OK && strstr(text, "every 4 steps") != NULL);
  free(text);

  /* Checkpoint and restore the step. */
  char cp[512];
  check(hma_checkpoint(avg, cp, sizeof cp, NULL) == HMA_OK);
  check(hma_set_step(avg, 3) == HMA_OK);
  check(hma_restore(avg, cp) == HMA_OK && hma_step_count(avg, &step) == HMA_OK && step == 9);
  check(hma_restore(avg, "garbage") == HMA_ERR_INVALID_ARGUMENT && strstr(hma_last_error(), "not an hma checkpoint"));

  check(hma_averager_free(&avg) == HMA_OK && avg == NULL);
  check(hma_averager_free(&avg) == HMA_OK); /* NULL: nothing to do */
  check(hma_paramset_free(&ps) == HMA_OK && ps == NULL);
}

static void periodic_and_options(void) {
  hma_paramset ps = NULL;
  float x[5];
  check(hma_paramset_create(&ps) == HMA_OK && hma_paramset_add_float(ps, x, 5) == HMA_OK);
  hma_averager avg = NULL;
  hma_options o;
  hma_options_init(&o);
  o.progress = HMA_PROGRESS_POLL;
  o.timeout_s = 60;
  o.chunk_bytes = 8;
  o.nonfinite = HMA_NONFINITE_ERROR;
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 3, 2, &o, &avg) == HMA_OK);
  for (int t = 0; t < 6; ++t) {
    for (int i = 0; i < 5; ++i) x[i] = (float)value(rank_, t, i);
    int averaged = -1;
    check(hma_step(avg, ps, &averaged) == HMA_OK && averaged == (t == 2 || t == 5));
    int bad = 0;
    for (int i = 0; i < 5; ++i) bad += x[i] != (float)(averaged ? mean(size_, t, i) : value(rank_, t, i));
    check(bad == 0);
  }
  /* A NaN on the last rank: HMA_ERR_NONFINITE on every rank, naming it (step 8 averages). */
  check(hma_set_step(avg, 8) == HMA_OK);
  for (int i = 0; i < 5; ++i) x[i] = 1.0f;
  if (rank_ == size_ - 1) x[3] = NAN;
  check(hma_step(avg, ps, NULL) == HMA_ERR_NONFINITE && strstr(hma_last_error(), "world rank(s)") != NULL);
  check(hma_averager_free(&avg) == HMA_OK && hma_paramset_free(&ps) == HMA_OK);

  /* Bad options and arguments: a status and a message naming them, on every rank. */
  hma_options_init(&o);
  o.algorithm = 7;
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 2, 0, &o, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "options.algorithm") != NULL && avg == NULL);
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 0, 0, NULL, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "period must be a positive value, got 0") != NULL);
  check(hma_averager_create(MPI_COMM_WORLD, "4:1,2:world", 0, NULL, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "periods must strictly increase") != NULL);
  check(hma_averager_create(MPI_COMM_WORLD, NULL, 0, NULL, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "schedule is NULL") != NULL);
  check(hma_step(NULL, NULL, NULL) == HMA_ERR_INVALID_ARGUMENT && strstr(hma_last_error(), "avg is NULL") != NULL);
  check(hma_paramset_create(NULL) == HMA_ERR_INVALID_ARGUMENT);
  check(hma_averager_create(MPI_COMM_NULL, "2:1", 0, NULL, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "comm is MPI_COMM_NULL") != NULL && avg == NULL);
  if (size_ >= 2) { /* a schedule that differs on one rank: HMA_ERR_MISMATCH everywhere */
    check(hma_averager_create_periodic(MPI_COMM_WORLD, rank_ == 1 ? 5 : 4, 0, NULL, &avg) == HMA_ERR_MISMATCH &&
          strstr(hma_last_error(), "rank 1") != NULL);
  }
  /* Device sets: a clear error where this build or machine has no GPU, else a set. */
  hma_device_paramset dps = NULL;
  const hma_status st = hma_device_paramset_create(-1, &dps);
  check(st == HMA_OK || (st == HMA_ERR && dps == NULL && strlen(hma_last_error()) > 10));
  check(hma_device_paramset_free(&dps) == HMA_OK && dps == NULL);
}

/* Beyond torch from C: weights (exact values: w in {1, 2}, values multiples of 6), the outer
 * optimizer with lr 1 and momentum 0 (the plain average, bit for bit), the divergence metric,
 * a bf16 wire, post-local SGD by schedule string, and their errors. */
static void beyond_torch(void) {
  hma_paramset ps = NULL;
  double x[M];
  check(hma_paramset_create(&ps) == HMA_OK && hma_paramset_add_double(ps, x, M) == HMA_OK);
  hma_averager avg = NULL;
  check(hma_averager_create(MPI_COMM_WORLD, "post:3,4", 3, NULL, &avg) == HMA_OK);
  /* weights 1 and 2 alternating: sum(w x) / sum(w), exact for these values */
  const double w = 1.0 + rank_ % 2;
  double wsum = 0, got_w = 0;
  for (int r = 0; r < size_; ++r) wsum += 1.0 + r % 2;
  check(hma_set_weight(avg, w) == HMA_OK && hma_weight(avg, &got_w) == HMA_OK && got_w == w);
  for (int t = 0; t < 8; ++t) { /* post:3 then every 4 from 3: steps 0, 1, 2, 3, 7 average */
    for (int i = 0; i < M; ++i) x[i] = value(rank_, t, i);
    int averaged = -1;
    check(hma_step(avg, ps, &averaged) == HMA_OK && averaged == (t <= 3 || t == 7));
    int bad = 0;
    for (int i = 0; i < M; ++i) {
      double want = 0;
      for (int r = 0; r < size_; ++r) want += (1.0 + r % 2) * value(r, t, i);
      want /= wsum;
      if (averaged) bad += fabs(x[i] - want) > 1e-12 * (1 + fabs(want));
      else bad += x[i] != value(rank_, t, i);
    }
    check(bad == 0);
  }
  check(hma_set_weight(avg, -1) == HMA_ERR_INVALID_ARGUMENT && strstr(hma_last_error(), "set_weight") != NULL);
  check(hma_set_step(avg, 11) == HMA_OK && hma_set_weight(avg, 0) == HMA_OK && hma_step(avg, ps, NULL) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "the weights of the group sum to zero") != NULL);
  double div = -1;
  int level = 0;
  int64_t step = 0;
  check(hma_last_divergence(avg, &div, &level, &step) == HMA_OK && level == -1 && step == -1);
  check(hma_averager_free(&avg) == HMA_OK);

  /* outer lr 1, momentum 0: the plain average; with the divergence metric and its value */
  hma_options o;
  hma_options_init(&o);
  o.outer_lr = 1;
  o.divergence = 1;
  hma_averager plain = NULL;
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_OK &&
        hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, NULL, &plain) == HMA_OK);
  hma_paramset ps2 = NULL;
  double y[M];
  check(hma_paramset_create(&ps2) == HMA_OK && hma_paramset_add_double(ps2, y, M) == HMA_OK);
  for (int t = 0; t < 3; ++t) {
    for (int i = 0; i < M; ++i) x[i] = y[i] = value(rank_, t, i) + 0.1 * rank_;
    check(hma_step(avg, ps, NULL) == HMA_OK && hma_step(plain, ps2, NULL) == HMA_OK);
    check(memcmp(x, y, sizeof x) == 0);
    check(hma_last_divergence(avg, &div, &level, &step) == HMA_OK && level == 0 && step == t);
    check(size_ == 1 ? div == 0 : div > 0.01);
  }
  size_t needed = 0;
  check(hma_checkpoint(avg, NULL, 0, &needed) == HMA_OK);
  char* text = (char*)malloc(needed);
  check(hma_checkpoint(avg, text, needed, NULL) == HMA_OK && strstr(text, "\nouter level 0 group 0 f32 0 f64 11 ") != NULL);
  check(hma_restore(avg, text) == HMA_OK);
  free(text);
  check(hma_averager_free(&avg) == HMA_OK && hma_averager_free(&plain) == HMA_OK);

  /* a bf16 wire: every averaged value is a bf16 number (its low 16 bits of f32 are zero) */
  hma_paramset pf = NULL;
  float z[M];
  check(hma_paramset_create(&pf) == HMA_OK && hma_paramset_add_float(pf, z, M) == HMA_OK);
  hma_options_init(&o);
  o.wire = "bf16";
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_OK);
  for (int i = 0; i < M; ++i) z[i] = (float)(1.0 + 0.001 * (i + rank_));
  check(hma_step(avg, pf, NULL) == HMA_OK);
  int wide = 0;
  for (int i = 0; i < M; ++i) {
    uint32_t b;
    memcpy(&b, &z[i], 4);
    wide += (b & 0xffffu) != 0;
  }
  check(size_ == 1 || wide == 0); /* one rank: the average is the identity, nothing travels */
  /* bf16 and fp16 arrays (bit patterns): 1.0 + rank on every rank averages to 1 + (size-1)/2 */
  uint16_t hb[4], hh[4];
  static const uint16_t fp16_of[4] = {0x3c00, 0x4000, 0x4200, 0x4400}; /* 1, 2, 3, 4 */
  for (int i = 0; i < 4; ++i) {
    const float v = 1.0f + (float)rank_;
    uint32_t b;
    memcpy(&b, &v, 4);
    hb[i] = (uint16_t)(b >> 16); /* small integers are exact in bf16 */
    hh[i] = fp16_of[rank_ % 4];
  }
  hma_paramset p16 = NULL;
  check(hma_paramset_create(&p16) == HMA_OK && hma_paramset_add_bf16(p16, hb, 4) == HMA_OK &&
        hma_paramset_add_fp16(p16, hh, 4) == HMA_OK);
  check(hma_step(avg, p16, NULL) == HMA_OK);
  /* mean of 1..size: 1 + (size-1)/2, exact in both formats for size <= 4 */
  const float m = 1.0f + (float)(size_ - 1) / 2.0f;
  uint32_t mb;
  memcpy(&mb, &m, 4);
  /* fp16 decoded by hand: (1 + mantissa / 1024) * 2^(exponent - 15) for these normal values */
  const double h2 = (1.0 + (hh[2] & 0x3ff) / 1024.0) * ldexp(1.0, ((hh[2] >> 10) & 0x1f) - 15);
  double want16 = 0;
  for (int r = 0; r < size_; ++r) want16 += 1 + r % 4;
  want16 /= size_;
  check(hb[0] == (uint16_t)(mb >> 16) && hb[3] == hb[0] && fabs(h2 - want16) <= want16 / 1024);
  check(hma_paramset_free(&p16) == HMA_OK);
  check(hma_averager_free(&avg) == HMA_OK);
  /* the options' errors name the field */
  o.wire = "bf16,f8";
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "options.wire='bf16,f8': 'f8' is not exact, bf16 or fp16") != NULL);
  hma_options_init(&o);
  o.outer_lr = 0.7;
  o.outer_momentum = 1.5;
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "momentum must be in [0, 1), got 1.5") != NULL);
  o.outer_momentum = 0.9;
  o.outer_level = 3;
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "the outer optimizer's level 3 does not exist") != NULL);
  o.outer_level = HMA_DEFAULT;
  o.outer_lr = 0; /* momentum 0.9 without an lr: refused, not silently ignored */
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "options.outer_lr is not > 0") != NULL);
  o.outer_lr = 0.7;
  o.divergence = 4;
  check(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, &o, &avg) == HMA_ERR_INVALID_ARGUMENT &&
        strstr(hma_last_error(), "options.divergence") != NULL);
  check(hma_paramset_free(&ps) == HMA_OK && hma_paramset_free(&ps2) == HMA_OK && hma_paramset_free(&pf) == HMA_OK);
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  check(strcmp(hma_version(), HMA_EXPECTED_VERSION) == 0);
  check(strcmp(hma_last_error(), "") == 0);
  values_and_modes();
  periodic_and_options();
  beyond_torch();
  if (rank_ == 0) printf("test_capi: np %d: all checks passed on every rank\n", size_);
  MPI_Finalize();
  return 0;
}
