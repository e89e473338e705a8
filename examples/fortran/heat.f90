! heat (Fortran): an ensemble of perturbed 1-D heat-diffusion runs, one member per MPI rank,
! averaged with hma on torch's hierarchical schedule "2:node,6:world" (the ranks of a node every
! 2 steps, all ranks every 6). Each rank then checks its result against a serial reference that
! simulates the whole ensemble itself. The C++ and C examples compute the same.
! Run: HMA_RANKS_PER_NODE=2 mpirun -np 4 build/examples/heat_fortran
program heat
  use, intrinsic :: iso_c_binding, only: c_double, c_intptr_t
  use, intrinsic :: iso_fortran_env, only: error_unit
  use mpi_f08
  use hma
  implicit none
  integer, parameter :: n = 64, steps = 12  ! grid points (boundaries fixed at 0), steps
  real(c_double), target :: u(n)            ! TARGET: hma keeps its address
  real(c_double), allocatable :: ref(:, :)
  integer(c_intptr_t) :: params, avg
  integer :: rank, np, t
  real(c_double) :: err, max_err
  logical :: ok

  call MPI_Init()
  call MPI_Comm_rank(MPI_COMM_WORLD, rank)
  call MPI_Comm_size(MPI_COMM_WORLD, np)

  u = initial(rank)
  call check(hma_paramset_create(params), 'hma_paramset_create')
  call check(hma_paramset_add(params, u), 'hma_paramset_add')  ! u stays ours
  call check(hma_averager_create(MPI_COMM_WORLD, '2:node,6:world', 0, avg), 'hma_averager_create')
  do t = 0, steps - 1
    call diffuse(u)
    call check(hma_step(avg, params), 'hma_step')  ! collective: averages when scheduled
  end do
  call check(hma_averager_free(avg), 'hma_averager_free')
  call check(hma_paramset_free(params), 'hma_paramset_free')

  allocate(ref(n, 0:np - 1))
  call reference(ref, node_size())
  err = maxval(abs(u - ref(:, rank)))
  deallocate(ref)  ! a main program's allocatables live to the end: free it (LeakSanitizer)
  call MPI_Allreduce(err, max_err, 1, MPI_DOUBLE_PRECISION, MPI_MAX, MPI_COMM_WORLD)
  ! hma divides first as the reference does, so the terms are equal; MPI may sum them in another
  ! order, which moves the last bits: 1e-12 is a generous bound for values of order 1.
  ok = max_err <= 1e-12_c_double
  if (rank == 0) write (*, '(a, i0, a, i0, a, es7.1, 2a)') 'heat (Fortran): ', np, ' ranks, ', &
      steps, ' steps, max |u - reference| = ', max_err, ': ', trim(merge('ok    ', 'FAILED', ok))
  call MPI_Finalize()
  if (.not. ok) stop 1

contains

  ! Every hma call returns a status; a failure is reported on every rank, so abort.
  subroutine check(status, what)
    integer, intent(in) :: status
    character(*), intent(in) :: what
    if (status /= HMA_OK) then
      write (error_unit, '(3a, i0, 2a)') 'heat (Fortran): ', what, ' failed (status ', status, '): ', &
          hma_last_error()
      call MPI_Abort(MPI_COMM_WORLD, 1)
    end if
  end subroutine

  ! Member r starts from sin(pi x) scaled by 1 + 0.1 r.
  function initial(r) result(v)
    integer, intent(in) :: r
    real(c_double) :: v(n)
    integer :: i
    v = [(sin(acos(-1.0_c_double) * i / (n - 1)) * (1 + 0.1_c_double * r), i = 0, n - 1)]
  end function

  ! One explicit step, u_i += 0.25 (u_{i-1} - 2 u_i + u_{i+1}), from the old values.
  subroutine diffuse(v)
    real(c_double), intent(inout) :: v(n)
    v(2:n - 1) = v(2:n - 1) + 0.25_c_double * (v(1:n - 2) - 2 * v(2:n - 1) + v(3:n))
  end subroutine

  ! hma's "node": HMA_RANKS_PER_NODE (the tests set 2), else the ranks sharing memory.
  integer function node_size() result(g)
    character(16) :: env
    integer :: length, status
    type(MPI_Comm) :: shared
    g = 0
    call get_environment_variable('HMA_RANKS_PER_NODE', env, length, status)
    if (status == 0 .and. length > 0) read (env, *, iostat=status) g
    if (g > 0) return
    call MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, shared)
    call MPI_Comm_size(shared, g)
    call MPI_Comm_free(shared)
  end function

  ! All np members serially (column r for rank r), averaged torch's way: after the update of
  ! step t (from 0), the level with the largest period dividing t averages, in contiguous blocks
  ! of its group size g, as the sum of u / g in rank order.
  subroutine reference(v, node)
    real(c_double), intent(out) :: v(n, 0:np - 1)
    integer, intent(in) :: node
    real(c_double) :: total(n)
    integer :: r, t, g, first
    do r = 0, np - 1
      v(:, r) = initial(r)
    end do
    do t = 0, steps - 1
      do r = 0, np - 1
        call diffuse(v(:, r))
      end do
      g = 0
      if (mod(t, 2) == 0) g = node
      if (mod(t, 6) == 0) g = np
      if (g == 0) cycle
      do first = 0, np - 1, g
        total = 0
        do r = first, first + g - 1
          total = total + v(:, r) / g
        end do
        v(:, first:first + g - 1) = spread(total, 2, g)
      end do
    end do
  end subroutine
end program heat
