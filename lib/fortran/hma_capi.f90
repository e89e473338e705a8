! hma_capi.f90: hma's C API (hma/hma.h) as bind(C) interfaces, for the `hma` module (hma.f90),
! which is what Fortran code uses. Internal: names and shapes may change with the C header.
! Handles are passed as type(c_ptr); hma_status is an int-sized enum, returned as integer(c_int).
module hma_capi
  use, intrinsic :: iso_c_binding
  implicit none
  private
  public :: c_text, c_handle_out, c_paramset_add
  public :: c_describe, c_checkpoint, c_version, c_last_error, c_strlen
  public :: c_create_periodic, c_create, c_step, c_start, c_average, c_start_average
  public :: c_step_count, c_set_step
  public :: c_paramset_create, c_paramset_free, c_averager_free, c_request_free
  public :: c_add_float, c_add_double, c_add_bf16, c_add_fp16, c_paramset_wait, c_request_wait
  public :: c_request_test, c_request_level, c_level_now
  public :: c_restore, c_save_checkpoint, c_load_checkpoint
  public :: c_set_weight, c_weight, c_last_divergence

  ! The shapes several functions share, then each function by its C name.
  abstract interface
    integer(c_int) function c_text(avg, buf, capacity, needed) bind(C)
      import :: c_ptr, c_int, c_size_t
      type(c_ptr), value :: avg, buf
      integer(c_size_t), value :: capacity
      integer(c_size_t), intent(out) :: needed
    end function
    integer(c_int) function c_handle_out(out) bind(C)  ! the shape of create/free calls
      import :: c_ptr, c_int
      type(c_ptr), intent(inout) :: out
    end function
    integer(c_int) function c_paramset_add(ps, data, n) bind(C)
      import :: c_ptr, c_int, c_size_t
      type(c_ptr), value :: ps, data
      integer(c_size_t), value :: n
    end function
    integer(c_int) function c_handle(h) bind(C)           ! one handle by value
      import :: c_ptr, c_int
      type(c_ptr), value :: h
    end function
    integer(c_int) function c_handle_int(h, value) bind(C)  ! test, request_level, level_now
      import :: c_ptr, c_int
      type(c_ptr), value :: h
      integer(c_int), intent(out) :: value
    end function
    integer(c_int) function c_handle_string(avg, s) bind(C)  ! restore, save/load checkpoint
      import :: c_ptr, c_int, c_char
      type(c_ptr), value :: avg
      character(kind=c_char), intent(in) :: s(*)
    end function
  end interface
  procedure(c_text), bind(C, name='hma_describe') :: c_describe
  procedure(c_text), bind(C, name='hma_checkpoint') :: c_checkpoint
  interface
    type(c_ptr) function c_version() bind(C, name='hma_version')
      import :: c_ptr
    end function
    type(c_ptr) function c_last_error() bind(C, name='hma_last_error')
      import :: c_ptr
    end function
    integer(c_size_t) function c_strlen(s) bind(C, name='strlen')
      import :: c_ptr, c_size_t
      type(c_ptr), value :: s
    end function
    integer(c_int) function c_create_periodic(comm, period, warmup, options, out) &
        bind(C, name='hma_averager_create_periodic_f')
      import :: c_ptr, c_int, c_int64_t
      integer(c_int), value :: comm
      integer(c_int64_t), value :: period, warmup
      type(c_ptr), value :: options
      type(c_ptr), intent(out) :: out
    end function
    integer(c_int) function c_create(comm, schedule, warmup, options, out) &
        bind(C, name='hma_averager_create_f')
      import :: c_ptr, c_int, c_int64_t, c_char
      integer(c_int), value :: comm
      character(kind=c_char), intent(in) :: schedule(*)
      integer(c_int64_t), value :: warmup
      type(c_ptr), value :: options
      type(c_ptr), intent(out) :: out
    end function
    integer(c_int) function c_step(avg, ps, averaged) bind(C, name='hma_step')
      import :: c_ptr, c_int
      type(c_ptr), value :: avg, ps
      integer(c_int), intent(out) :: averaged
    end function
    integer(c_int) function c_start(avg, ps, request) bind(C, name='hma_start')
      import :: c_ptr, c_int
      type(c_ptr), value :: avg, ps
      type(c_ptr), intent(out) :: request
    end function
    integer(c_int) function c_average(avg, ps, level) bind(C, name='hma_average')
      import :: c_ptr, c_int, c_size_t
      type(c_ptr), value :: avg, ps
      integer(c_size_t), value :: level
    end function
    integer(c_int) function c_start_average(avg, ps, level, request) &
        bind(C, name='hma_start_average')
      import :: c_ptr, c_int, c_size_t
      type(c_ptr), value :: avg, ps
      integer(c_size_t), value :: level
      type(c_ptr), intent(out) :: request
    end function
    integer(c_int) function c_step_count(avg, step) bind(C, name='hma_step_count')
      import :: c_ptr, c_int, c_int64_t
      type(c_ptr), value :: avg
      integer(c_int64_t), intent(out) :: step
    end function
    integer(c_int) function c_set_step(avg, step) bind(C, name='hma_set_step')
      import :: c_ptr, c_int, c_int64_t
      type(c_ptr), value :: avg
      integer(c_int64_t), value :: step
    end function
    integer(c_int) function c_set_weight(avg, weight) bind(C, name='hma_set_weight')
      import :: c_ptr, c_int, c_double
      type(c_ptr), value :: avg
      real(c_double), value :: weight
    end function
    integer(c_int) function c_weight(avg, weight) bind(C, name='hma_weight')
      import :: c_ptr, c_int, c_double
      type(c_ptr), value :: avg
      real(c_double), intent(out) :: weight
    end function
    integer(c_int) function c_last_divergence(avg, value, level, step) bind(C, name='hma_last_divergence')
      import :: c_ptr, c_int, c_double, c_int64_t
      type(c_ptr), value :: avg
      real(c_double), intent(out) :: value
      integer(c_int), intent(out) :: level
      integer(c_int64_t), intent(out) :: step
    end function
  end interface
  procedure(c_handle_out), bind(C, name='hma_paramset_create') :: c_paramset_create
  procedure(c_handle_out), bind(C, name='hma_paramset_free') :: c_paramset_free
  procedure(c_handle_out), bind(C, name='hma_averager_free') :: c_averager_free
  procedure(c_handle_out), bind(C, name='hma_request_free') :: c_request_free
  procedure(c_paramset_add), bind(C, name='hma_paramset_add_float') :: c_add_float
  procedure(c_paramset_add), bind(C, name='hma_paramset_add_double') :: c_add_double
  procedure(c_paramset_add), bind(C, name='hma_paramset_add_bf16') :: c_add_bf16
  procedure(c_paramset_add), bind(C, name='hma_paramset_add_fp16') :: c_add_fp16
  procedure(c_handle), bind(C, name='hma_paramset_wait') :: c_paramset_wait
  procedure(c_handle), bind(C, name='hma_request_wait') :: c_request_wait
  procedure(c_handle_int), bind(C, name='hma_request_test') :: c_request_test
  procedure(c_handle_int), bind(C, name='hma_request_level') :: c_request_level
  procedure(c_handle_int), bind(C, name='hma_level_now') :: c_level_now
  procedure(c_handle_string), bind(C, name='hma_restore') :: c_restore
  procedure(c_handle_string), bind(C, name='hma_save_checkpoint') :: c_save_checkpoint
  procedure(c_handle_string), bind(C, name='hma_load_checkpoint') :: c_load_checkpoint
end module hma_capi
