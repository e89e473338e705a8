! hma.f90: the Fortran 2008 module `hma` (and Fortran 2018's assumed-rank dummies for arrays),
! bind(C) over hma's C API (hma/hma.h).
!
! Handles (parameter sets, averagers, requests) are integer(c_intptr_t), 0 for none. Every
! function returns an integer status, HMA_OK (0) or an HMA_ERR_* code; on anything but HMA_OK,
! hma_last_error() gives the message (the C++ library's, naming the argument, rank, level or
! step). Collective calls (create, step, start, average, restore) must be made by every rank
! of the averager's communicator in the same order; a rank that diverges gets an error on every
! rank (HMA_ERR_MISMATCH or HMA_ERR_TIMEOUT), never a hang. set_step is local: set the same step
! on every rank (the next average compares the step counters; 0 <= step <= 2**62). You own MPI: call
! MPI_Init before and MPI_Finalize after (free the handles first).
!
!   use, intrinsic :: iso_c_binding
!   use mpi_f08
!   use hma
!   real(c_double), target :: u(n)          ! TARGET: hma keeps its address
!   integer(c_intptr_t) :: ps, avg
!   st = hma_paramset_create(ps)
!   st = hma_paramset_add(ps, u)            ! your array stays yours
!   st = hma_averager_create(MPI_COMM_WORLD, '2:node,8:world', 0, avg)
!   do it = 1, iters; call compute(u); st = hma_step(avg, ps); end do
!   st = hma_averager_free(avg); st = hma_paramset_free(ps)
!
! hma_paramset_add takes real(c_float) or real(c_double) arrays of any rank (assumed-rank dummies:
! a 2-D or 3-D state array goes in as it is; a scalar counts as one element) that are contiguous
! (a strided section is refused, not copied into a temporary hma would then keep) and outlive
! the set; hma_paramset_add_bf16/_fp16 the same for integer(c_int16_t) bit patterns. Periods, warmups and levels are default integers (levels from 0, as in C); the step
! counter is integer(c_int64_t). Texts (hma_describe, hma_checkpoint) come back as allocatable
! strings. Device buffers are C and C++ only. Thread safety as in C, except that a refusal made
! by this module itself (the contiguity check) is kept in one module variable, not per thread.
module hma
  use, intrinsic :: iso_c_binding
  use mpi_f08, only: MPI_Comm
  use hma_capi
  implicit none
  private

  ! Status codes (hma_status).
  integer, parameter, public :: HMA_OK = 0, HMA_ERR_INVALID_ARGUMENT = 1, HMA_ERR_MISMATCH = 2, &
                                HMA_ERR_TIMEOUT = 3, HMA_ERR_NONFINITE = 4, HMA_ERR = 5
  ! Choices for hma_options; HMA_DEFAULT leaves a field to the environment and the defaults.
  integer, parameter, public :: HMA_DEFAULT = -1, &
      HMA_PROGRESS_POLL = 0, HMA_PROGRESS_THREAD = 1, &
      HMA_REDUCTION_AUTO = 0, HMA_REDUCTION_MPI = 1, HMA_REDUCTION_RING = 2, &
      HMA_ALGORITHM_AUTO = 0, HMA_ALGORITHM_FLAT = 1, HMA_ALGORITHM_TWO_LEVEL = 2, &
      HMA_NONFINITE_IGNORE = 0, HMA_NONFINITE_ERROR = 1, HMA_NONFINITE_SKIP = 2

  ! struct hma_options, field for field; see hma/hma.h. Set it with hma_options_init first.
  type, bind(C), public :: hma_options
    real(c_double) :: timeout_s            ! < 0: default; 0 or infinity: no limit
    integer(c_long_long) :: chunk_bytes    ! < 0: default; 0: one piece
    integer(c_int) :: progress, reduction, algorithm, nonfinite, check, ranks_per_node
    ! beyond torch: outer optimizer (outer_lr > 0), divergence metric, 16-bit wires
    real(c_double) :: outer_lr, outer_momentum
    integer(c_int) :: outer_nesterov, outer_level, divergence
    type(c_ptr) :: wire                    ! c_loc of 'bf16'//c_null_char (TARGET), or c_null_ptr
  end type

  public :: hma_options_init, hma_version, hma_last_error
  public :: hma_paramset_create, hma_paramset_free, hma_paramset_add, hma_paramset_wait
  public :: hma_averager_create_periodic, hma_averager_create, hma_averager_free
  public :: hma_step, hma_start, hma_average, hma_start_average
  public :: hma_request_wait, hma_request_test, hma_request_level, hma_request_free
  public :: hma_step_count, hma_set_step, hma_level_now, hma_describe
  public :: hma_checkpoint, hma_restore, hma_save_checkpoint, hma_load_checkpoint
  public :: hma_set_weight, hma_weight, hma_last_divergence
  public :: hma_paramset_add_bf16, hma_paramset_add_fp16

  ! Registers a contiguous real(c_float) or real(c_double) array of any rank (TARGET) with a set.
  interface hma_paramset_add
    module procedure paramset_add_float, paramset_add_double
  end interface

  ! Every field HMA_DEFAULT (timeout and chunk -1): call hma_options_init(opts).
  interface
    subroutine hma_options_init(options) bind(C, name='hma_options_init')
      import :: hma_options
      type(hma_options), intent(out) :: options
    end subroutine
  end interface

  character(:), allocatable :: fortran_error  ! a refusal by this module, until the next C error

contains

  ! ---- helpers: handles <-> C pointers, C strings, statuses
  pure type(c_ptr) function ptr(h)
    integer(c_intptr_t), intent(in) :: h
    ptr = transfer(h, c_null_ptr)
  end function
  pure integer(c_intptr_t) function handle(p)
    type(c_ptr), intent(in) :: p
    handle = transfer(p, 0_c_intptr_t)
  end function
  function from_c(p) result(s)  ! a NUL-terminated C string ('' for NULL)
    type(c_ptr), intent(in) :: p
    character(:), allocatable :: s
    character(kind=c_char), pointer :: chars(:)
    integer :: i
    if (.not. c_associated(p)) then
      s = ''
      return
    end if
    call c_f_pointer(p, chars, [c_strlen(p)])
    allocate(character(size(chars)) :: s)
    do i = 1, size(chars)
      s(i:i) = chars(i)
    end do
  end function
  integer function ret(status)  ! a C status; a C error replaces this module's own message
    integer(c_int), intent(in) :: status
    ret = status
    if (status /= HMA_OK .and. allocated(fortran_error)) deallocate(fortran_error)
  end function
  integer function with_handle(fn, h) result(status)  ! create/free: C rewrites the handle
    procedure(c_handle_out) :: fn
    integer(c_intptr_t), intent(inout) :: h
    type(c_ptr) :: p
    p = c_null_ptr
    p = ptr(h)
    status = ret(fn(p))
    h = handle(p)
  end function
  integer function add(ps, contiguous, n, data, fn) result(status)
    integer(c_intptr_t), intent(in) :: ps
    logical, intent(in) :: contiguous
    integer(c_size_t), intent(in) :: n
    type(c_ptr), intent(in) :: data
    procedure(c_paramset_add) :: fn
    character(20) :: elements
    if (contiguous) then
      status = ret(fn(ptr(ps), data, n))
    else
      write (elements, '(i0)') n
      fortran_error = 'hma: hma_paramset_add: x (' // trim(elements) // ' elements) is not ' // &
          'contiguous; pass a contiguous array (hma keeps its address, not a temporary copy''s)'
      status = HMA_ERR_INVALID_ARGUMENT
    end if
  end function
  ! hma.h's two-call text outputs: ask for the length (NULL buffer, capacity 0), then fetch.
  integer function get_text(fn, avg, text) result(status)
    procedure(c_text) :: fn
    integer(c_intptr_t), intent(in) :: avg
    character(:), allocatable, intent(out) :: text
    character(kind=c_char), allocatable, target :: buf(:)
    integer(c_size_t) :: capacity, needed
    text = ''
    needed = 0
    status = fn(ptr(avg), c_null_ptr, 0_c_size_t, needed)
    if (needed == 0) then  ! nothing measured: a real failure
      status = ret(int(status, c_int))
      return
    end if
    capacity = needed
    allocate(buf(capacity))
    status = ret(fn(ptr(avg), c_loc(buf), capacity, needed))
    if (status == HMA_OK) text = from_c(c_loc(buf))
  end function
  type(c_ptr) function options_ptr(options)
    type(hma_options), intent(in), optional, target :: options
    options_ptr = c_null_ptr
    if (present(options)) options_ptr = c_loc(options)
  end function

  function hma_version() result(s)  ! "0.2.0": the library's version
    character(:), allocatable :: s
    s = from_c(c_version())
  end function
  function hma_last_error() result(s)  ! the message of the last call that failed ('' if none)
    character(:), allocatable :: s
    if (allocated(fortran_error)) then
      s = fortran_error
    else
      s = from_c(c_last_error())
    end if
  end function

  ! ---- parameter sets
  integer function hma_paramset_create(ps) result(status)
    integer(c_intptr_t), intent(out) :: ps
    ps = 0
    status = with_handle(c_paramset_create, ps)
  end function
  integer function hma_paramset_free(ps) result(status)  ! waits for its average; ps = 0
    integer(c_intptr_t), intent(inout) :: ps
    status = with_handle(c_paramset_free, ps)
  end function
  ! Arrays of any rank (assumed rank): the C address of the first element, or null for an empty
  ! or non-contiguous one (which add() refuses; c_loc needs a contiguous array).
  integer function paramset_add_float(ps, x) result(status)
    integer(c_intptr_t), intent(in) :: ps
    real(c_float), intent(inout), target :: x(..)
    type(c_ptr) :: data
    data = c_null_ptr
    if (size(x) > 0 .and. is_contiguous(x)) data = c_loc(x)
    status = add(ps, is_contiguous(x), size(x, kind=c_size_t), data, c_add_float)
  end function
  integer function paramset_add_double(ps, x) result(status)
    integer(c_intptr_t), intent(in) :: ps
    real(c_double), intent(inout), target :: x(..)
    type(c_ptr) :: data
    data = c_null_ptr
    if (size(x) > 0 .and. is_contiguous(x)) data = c_loc(x)
    status = add(ps, is_contiguous(x), size(x, kind=c_size_t), data, c_add_double)
  end function
  ! 16-bit arrays as bit patterns (integer(c_int16_t)), any rank: bfloat16 or IEEE half precision.
  integer function hma_paramset_add_bf16(ps, x) result(status)
    integer(c_intptr_t), intent(in) :: ps
    integer(c_int16_t), intent(inout), target :: x(..)
    type(c_ptr) :: data
    data = c_null_ptr
    if (size(x) > 0 .and. is_contiguous(x)) data = c_loc(x)
    status = add(ps, is_contiguous(x), size(x, kind=c_size_t), data, c_add_bf16)
  end function
  integer function hma_paramset_add_fp16(ps, x) result(status)
    integer(c_intptr_t), intent(in) :: ps
    integer(c_int16_t), intent(inout), target :: x(..)
    type(c_ptr) :: data
    data = c_null_ptr
    if (size(x) > 0 .and. is_contiguous(x)) data = c_loc(x)
    status = add(ps, is_contiguous(x), size(x, kind=c_size_t), data, c_add_fp16)
  end function
  integer function hma_paramset_wait(ps) result(status)  ! waits for its average in flight
    integer(c_intptr_t), intent(in) :: ps
    status = ret(c_paramset_wait(ptr(ps)))
  end function

  ! ---- averagers: collective over comm (duplicated; yours stays yours)
  ! torch's PeriodicModelAverager: every `period` steps from `warmup`, over all of comm.
  integer function hma_averager_create_periodic(comm, period, warmup, avg, options) result(status)
    type(MPI_Comm), intent(in) :: comm
    integer, intent(in) :: period, warmup
    integer(c_intptr_t), intent(out) :: avg
    type(hma_options), intent(in), optional, target :: options
    type(c_ptr) :: p
    p = c_null_ptr
    status = ret(c_create_periodic(int(comm%MPI_VAL, c_int), int(period, c_int64_t), &
                                   int(warmup, c_int64_t), options_ptr(options), p))
    avg = handle(p)
  end function
  ! torch's HierarchicalModelAverager from a schedule "period:group,..." ("2:node,8:world").
  integer function hma_averager_create(comm, schedule, warmup, avg, options) result(status)
    type(MPI_Comm), intent(in) :: comm
    character(*), intent(in) :: schedule
    integer, intent(in) :: warmup
    integer(c_intptr_t), intent(out) :: avg
    type(hma_options), intent(in), optional, target :: options
    type(c_ptr) :: p
    p = c_null_ptr
    status = ret(c_create(int(comm%MPI_VAL, c_int), trim(schedule) // c_null_char, &
                          int(warmup, c_int64_t), options_ptr(options), p))
    avg = handle(p)
  end function
  integer function hma_averager_free(avg) result(status)  ! completes its averages; avg = 0
    integer(c_intptr_t), intent(inout) :: avg
    status = with_handle(c_averager_free, avg)
  end function

  ! Blocking: averages ps if this step has a level, then advances the step.
  integer function hma_step(avg, ps, averaged) result(status)
    integer(c_intptr_t), intent(in) :: avg, ps
    logical, intent(out), optional :: averaged
    integer(c_int) :: a
    a = 0
    status = ret(c_step(ptr(avg), ptr(ps), a))
    if (present(averaged)) averaged = a /= 0
  end function
  ! Non-blocking step: request is empty (level -1) on a step without averaging. Free it.
  integer function hma_start(avg, ps, request) result(status)
    integer(c_intptr_t), intent(in) :: avg, ps
    integer(c_intptr_t), intent(out) :: request
    type(c_ptr) :: p
    p = c_null_ptr
    status = ret(c_start(ptr(avg), ptr(ps), p))
    request = handle(p)
  end function
  ! Averages level `level` (0 = the first) now, outside the schedule; the step is unchanged.
  integer function hma_average(avg, ps, level) result(status)
    integer(c_intptr_t), intent(in) :: avg, ps
    integer, intent(in) :: level
    status = ret(c_average(ptr(avg), ptr(ps), int(level, c_size_t)))
  end function
  integer function hma_start_average(avg, ps, level, request) result(status)
    integer(c_intptr_t), intent(in) :: avg, ps
    integer, intent(in) :: level
    integer(c_intptr_t), intent(out) :: request
    type(c_ptr) :: p
    p = c_null_ptr
    status = ret(c_start_average(ptr(avg), ptr(ps), int(level, c_size_t), p))
    request = handle(p)
  end function

  ! ---- requests
  integer function hma_request_wait(request) result(status)
    integer(c_intptr_t), intent(in) :: request
    status = ret(c_request_wait(ptr(request)))
  end function
  integer function hma_request_test(request, done) result(status)  ! done: complete, as waited
    integer(c_intptr_t), intent(in) :: request
    logical, intent(out) :: done
    integer(c_int) :: d
    d = 0
    status = ret(c_request_test(ptr(request), d))
    done = d /= 0
  end function
  integer function hma_request_level(request, level) result(status)  ! -1: an empty request
    integer(c_intptr_t), intent(in) :: request
    integer(c_int), intent(out) :: level
    level = -1
    status = ret(c_request_level(ptr(request), level))
  end function
  integer function hma_request_free(request) result(status)  ! waits if in flight; request = 0
    integer(c_intptr_t), intent(inout) :: request
    status = with_handle(c_request_free, request)
  end function

  ! ---- the step counter, checkpoints, description
  integer function hma_step_count(avg, step) result(status)
    integer(c_intptr_t), intent(in) :: avg
    integer(c_int64_t), intent(out) :: step
    step = 0
    status = ret(c_step_count(ptr(avg), step))
  end function
  integer function hma_set_step(avg, step) result(status)  ! local; checked at the next average
    integer(c_intptr_t), intent(in) :: avg
    integer(c_int64_t), intent(in) :: step
    status = ret(c_set_step(ptr(avg), step))
  end function
  integer function hma_level_now(avg, level) result(status)  ! -1: this step does not average
    integer(c_intptr_t), intent(in) :: avg
    integer(c_int), intent(out) :: level
    level = -1
    status = ret(c_level_now(ptr(avg), level))
  end function
  ! ---- beyond torch
  integer function hma_set_weight(avg, weight) result(status)  ! this rank's weight (default 1)
    integer(c_intptr_t), intent(in) :: avg
    real(c_double), intent(in) :: weight
    status = ret(c_set_weight(ptr(avg), weight))
  end function
  integer function hma_weight(avg, weight) result(status)
    integer(c_intptr_t), intent(in) :: avg
    real(c_double), intent(out) :: weight
    weight = 0
    status = ret(c_weight(ptr(avg), weight))
  end function
  ! The spread at the last completed average (options%divergence = 1); level -1: none yet.
  integer function hma_last_divergence(avg, value, level, step) result(status)
    integer(c_intptr_t), intent(in) :: avg
    real(c_double), intent(out) :: value
    integer(c_int), intent(out) :: level
    integer(c_int64_t), intent(out) :: step
    value = 0
    level = -1
    step = -1
    status = ret(c_last_divergence(ptr(avg), value, level, step))
  end function

  integer function hma_describe(avg, text) result(status)  ! which group averages how often
    integer(c_intptr_t), intent(in) :: avg
    character(:), allocatable, intent(out) :: text
    status = get_text(c_describe, avg, text)
  end function
  integer function hma_checkpoint(avg, text) result(status)  ! the averager's state as text
    integer(c_intptr_t), intent(in) :: avg
    character(:), allocatable, intent(out) :: text
    status = get_text(c_checkpoint, avg, text)
  end function
  integer function hma_restore(avg, text) result(status)  ! collective; text of hma_checkpoint
    integer(c_intptr_t), intent(in) :: avg
    character(*), intent(in) :: text
    status = ret(c_restore(ptr(avg), text // c_null_char))
  end function
  integer function hma_save_checkpoint(avg, path) result(status)
    integer(c_intptr_t), intent(in) :: avg
    character(*), intent(in) :: path
    status = ret(c_save_checkpoint(ptr(avg), trim(path) // c_null_char))
  end function
  integer function hma_load_checkpoint(avg, path) result(status)  ! collective
    integer(c_intptr_t), intent(in) :: avg
    character(*), intent(in) :: path
    status = ret(c_load_checkpoint(ptr(avg), trim(path) // c_null_char))
  end function
end module hma
