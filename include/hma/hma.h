/* hma/hma.h: the C API of hma (C99 and later; Fortran uses it through the `hma` module).
 *
 * Opaque handles over the C++ library: a parameter set (hma_paramset: your arrays, packed into
 * hma's buffer for each average), an averager (hma_averager: the schedule, its communicators and
 * options) and a started average (hma_request). Every function returns an hma_status; on
 * anything but HMA_OK, hma_last_error() gives the message (the same text the C++ API throws,
 * naming the argument, rank, level or step). No C++ exception ever crosses this API. Collective
 * calls (create, step, start, average, restore, ...) must be made by every rank of the averager's
 * communicator in the same order, as in C++; a rank that diverges gets an error on every rank
 * (HMA_ERR_MISMATCH or HMA_ERR_TIMEOUT), never a hang.
 *
 *   hma_paramset ps; hma_averager avg; int averaged;
 *   hma_paramset_create(&ps);
 *   hma_paramset_add_double(ps, u, n);                     // your array stays yours
 *   hma_averager_create(MPI_COMM_WORLD, "2:node,8:world", 0, NULL, &avg);
 *   for (step...) { compute(u); hma_step(avg, ps, &averaged); }
 *   hma_averager_free(&avg); hma_paramset_free(&ps);
 *
 * On an error you cannot recover from, call MPI_Abort: the other ranks got the same status.
 */
#ifndef HMA_HMA_H
#define HMA_HMA_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum hma_status {
  HMA_OK = 0,
  HMA_ERR_INVALID_ARGUMENT = 1, /* a bad argument, option or environment variable */
  HMA_ERR_MISMATCH = 2,         /* ranks disagree (schedule, settings, layout, step) */
  HMA_ERR_TIMEOUT = 3,          /* a rank did not join within the timeout; may be waited again */
  HMA_ERR_NONFINITE = 4,        /* NaN or infinity with nonfinite = error */
  HMA_ERR = 5                   /* any other failure (MPI, CUDA, memory, misuse) */
} hma_status;

typedef struct hma_paramset_s* hma_paramset;
typedef struct hma_device_paramset_s* hma_device_paramset;
typedef struct hma_averager_s* hma_averager;
typedef struct hma_request_s* hma_request;

/* Choices for hma_options; HMA_DEFAULT (-1) leaves a field to the environment and the defaults
 * (the same as the C++ AveragerOptions' unset fields). */
enum {
  HMA_DEFAULT = -1,
  HMA_PROGRESS_POLL = 0,
  HMA_PROGRESS_THREAD = 1,
  HMA_REDUCTION_AUTO = 0,
  HMA_REDUCTION_MPI = 1,
  HMA_REDUCTION_RING = 2,
  HMA_ALGORITHM_AUTO = 0,
  HMA_ALGORITHM_FLAT = 1,
  HMA_ALGORITHM_TWO_LEVEL = 2,
  HMA_NONFINITE_IGNORE = 0,
  HMA_NONFINITE_ERROR = 1,
  HMA_NONFINITE_SKIP = 2
};

typedef struct hma_options {
  double timeout_s;           /* < 0: default (HMA_TIMEOUT_S, else 1800); 0 or inf: no limit */
  long long chunk_bytes;      /* < 0: default (HMA_CHUNK_BYTES, else 4 MiB); 0: one piece (two-level:
                                 pieces of at most 1 MiB regardless) */
  int progress;               /* HMA_PROGRESS_* or HMA_DEFAULT */
  int reduction;              /* HMA_REDUCTION_* or HMA_DEFAULT */
  int algorithm;              /* HMA_ALGORITHM_* or HMA_DEFAULT */
  int nonfinite;              /* HMA_NONFINITE_* or HMA_DEFAULT */
  int check;                  /* 1 on, 0 off (unsafe), HMA_DEFAULT: HMA_CHECK, else on */
  int ranks_per_node;         /* > 0: emulate nodes of this many ranks; 0 or HMA_DEFAULT:
                                 HMA_RANKS_PER_NODE if set, else detect (shared memory) */
  /* Beyond torch (README "Beyond torch's averagers"; C++ AveragerOptions::outer, divergence, wire) */
  double outer_lr;            /* > 0: an outer optimizer (SlowMo/DiLoCo) with the next three fields;
                                 <= 0: HMA_OUTER if set, else none */
  double outer_momentum;      /* in [0, 1) */
  int outer_nesterov;         /* 1: Nesterov momentum (needs outer_momentum > 0) */
  int outer_level;            /* the level it applies at; HMA_DEFAULT: the last (world) level */
  int divergence;             /* 1: measure it at each average (hma_last_divergence), 0 off,
                                 HMA_DEFAULT: HMA_DIVERGENCE, else off */
  const char* wire;           /* "bf16", "fp16", "exact" for every level, or one per level
                                 ("exact,bf16"); NULL: HMA_WIRE, else exact */
} hma_options;

/* Every field HMA_DEFAULT (timeout and chunk -1). NULL options in a create call mean the same. */
void hma_options_init(hma_options* options);

/* "0.2.0": the library's version (HMA_VERSION_STRING is the headers'). */
const char* hma_version(void);
/* The message of the last call on this thread that did not return HMA_OK ("" if none). */
const char* hma_last_error(void);

/* ---- parameter sets (host memory) */
hma_status hma_paramset_create(hma_paramset* out);
/* Waits for an average in flight first; sets *ps to NULL. NULL or *ps NULL: nothing to do. */
hma_status hma_paramset_free(hma_paramset* ps);
/* Registers your array (it must outlive the set's averages); each average packs it, reduces and
 * writes the result back. Every rank must register the same arrays in the same order. */
hma_status hma_paramset_add_float(hma_paramset ps, float* data, size_t n);
hma_status hma_paramset_add_double(hma_paramset ps, double* data, size_t n);
/* 16-bit arrays, as bit patterns (torch.bfloat16 / torch.float16, CUDA __nv_bfloat16 / __half):
 * averaged in f32 arithmetic with 16-bit results, always flat (README "Beyond torch's averagers"). */
hma_status hma_paramset_add_bf16(hma_paramset ps, uint16_t* data, size_t n);
hma_status hma_paramset_add_fp16(hma_paramset ps, uint16_t* data, size_t n);
/* Zero-copy: hma owns n new elements (set to 0) and averages them in place; *data points at
 * them until the next allocate or add of the same type on this set (then ask again with
 * hma_paramset_array_*). *index (may be NULL): the array's number among this set's zero-copy
 * arrays, both types counted, from 0. */
hma_status hma_paramset_allocate_float(hma_paramset ps, size_t n, float** data, size_t* index);
hma_status hma_paramset_allocate_double(hma_paramset ps, size_t n, double** data, size_t* index);
/* The current pointer and length of zero-copy array `index` (from allocate). */
hma_status hma_paramset_array_float(hma_paramset ps, size_t index, float** data, size_t* n);
hma_status hma_paramset_array_double(hma_paramset ps, size_t index, double** data, size_t* n);
/* Waits for this set's average in flight, if any. */
hma_status hma_paramset_wait(hma_paramset ps);

/* ---- parameter sets in device memory (CUDA builds; elsewhere create returns HMA_ERR saying
 * why). `stream` arguments are cudaStream_t (NULL: the legacy default stream). */
hma_status hma_device_paramset_create(int device, hma_device_paramset* out);
hma_status hma_device_paramset_free(hma_device_paramset* ps);
hma_status hma_device_paramset_add_float(hma_device_paramset ps, float* device_data, size_t n);
hma_status hma_device_paramset_add_double(hma_device_paramset ps, double* device_data, size_t n);

/* ---- averagers (collective over comm; comm is duplicated, yours stays yours). *out is NULL
 * unless HMA_OK. A bad argument on one rank is an error on every rank. */
/* torch's PeriodicModelAverager: every `period` steps from `warmup`, over all of comm. */
hma_status hma_averager_create_periodic(MPI_Comm comm, int64_t period, int64_t warmup,
                                        const hma_options* options, hma_averager* out);
/* torch's HierarchicalModelAverager from a schedule "period:group,..." ("2:node,8:world",
 * "4:2,16:8"): the level of the largest period dividing the step averages. */
hma_status hma_averager_create(MPI_Comm comm, const char* schedule, int64_t warmup,
                               const hma_options* options, hma_averager* out);
/* Completes averages in flight first; sets *avg to NULL. */
hma_status hma_averager_free(hma_averager* avg);

/* Blocking: averages `ps` if this step has a level, then advances the step. *averaged (may be
 * NULL): 1 if it averaged, else 0. */
hma_status hma_step(hma_averager avg, hma_paramset ps, int* averaged);
hma_status hma_step_device(hma_averager avg, hma_device_paramset ps, void* stream, int* averaged);
/* Non-blocking: starts this step's average (if any) and advances the step. *request is empty
 * (its level -1) on a step without averaging. Free every request (hma_request_free). */
hma_status hma_start(hma_averager avg, hma_paramset ps, hma_request* request);
hma_status hma_start_device(hma_averager avg, hma_device_paramset ps, void* stream, hma_request* request);
/* Averages level `level` now (0 = the first level), outside the schedule; the step is unchanged. */
hma_status hma_average(hma_averager avg, hma_paramset ps, size_t level);
hma_status hma_start_average(hma_averager avg, hma_paramset ps, size_t level, hma_request* request);

hma_status hma_request_wait(hma_request request);
/* *done: 1 when complete (then as after wait), else 0. */
hma_status hma_request_test(hma_request request, int* done);
/* The level being averaged, -1 for an empty request. */
hma_status hma_request_level(hma_request request, int* level);
/* Waits for the average if it is still in flight (MPI forbids dropping it; after a timeout it
 * waits at most one more, then leaks what MPI may still write into); sets *request NULL. Errors
 * of that wait are not reported: call hma_request_wait first to see them. */
hma_status hma_request_free(hma_request* request);

/* ---- beyond torch */
/* Weighted averaging: this rank's weight in the averages that follow (default 1; local): each
 * average gives sum(w_i x_i) / sum(w_i) over its group; weights are rounded to multiples of 2^-32
 * and must be in [0, 2^31); a group whose weights sum to 0 gets HMA_ERR_INVALID_ARGUMENT on every
 * rank. Needs the agreement check (options.check not 0). */
hma_status hma_set_weight(hma_averager avg, double weight);
hma_status hma_weight(hma_averager avg, double* weight);
/* With options.divergence: the group's spread max_i ||x_i - mean|| / ||mean|| at the last average
 * completed on this rank, its level and step counter; *level = -1 (and *value = 0, *step = -1)
 * before the first one or without the option. value, level and step may be NULL. */
hma_status hma_last_divergence(hma_averager avg, double* value, int* level, int64_t* step);

/* ---- the step counter, checkpoints, description */
hma_status hma_step_count(hma_averager avg, int64_t* step);
/* Local, not collective: sets this rank's step counter (a restart). Set the same step on every
 * rank: the next average's agreement check compares the step counters and fails on every rank of
 * its group (HMA_ERR_MISMATCH) if they differ. HMA_ERR_ARG for a step below 0 or above 2^62. */
hma_status hma_set_step(hma_averager avg, int64_t step);
/* The level this step averages, -1 if none. */
hma_status hma_level_now(hma_averager avg, int* level);
/* Text outputs: writes at most `capacity` bytes including the terminating NUL into `buf` and the
 * full length plus one into *needed (may be NULL); HMA_ERR when it did not fit (the text is then
 * cut). buf NULL with capacity 0 only asks for *needed (HMA_OK). */
hma_status hma_describe(hma_averager avg, char* buf, size_t capacity, size_t* needed);
hma_status hma_checkpoint(hma_averager avg, char* buf, size_t capacity, size_t* needed);
hma_status hma_restore(hma_averager avg, const char* checkpoint);  /* collective */
hma_status hma_save_checkpoint(hma_averager avg, const char* path);
hma_status hma_load_checkpoint(hma_averager avg, const char* path); /* collective */

/* ---- for the Fortran module: the same calls with a Fortran communicator handle */
hma_status hma_averager_create_periodic_f(MPI_Fint comm, int64_t period, int64_t warmup,
                                          const hma_options* options, hma_averager* out);
hma_status hma_averager_create_f(MPI_Fint comm, const char* schedule, int64_t warmup,
                                 const hma_options* options, hma_averager* out);

#ifdef __cplusplus
}
#endif

#endif /* HMA_HMA_H */
