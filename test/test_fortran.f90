! The Fortran module's hma_paramset_add on arrays of any rank: 2-D, 3-D and 7-D arrays, a
! scalar, a contiguous 2-D section and a 2-D bf16 array, averaged at the world level and compared
! element by element with the mean computed here from the rank count (integers: every sum is
! exact, in bf16 too); a non-contiguous 2-D section is refused with the module's message and
! registers nothing. Every rank reports; the job fails (exit 1 on every rank) if any rank saw a
! difference. Run under mpirun at several rank counts (test/meson.build).
program test_fortran
  use, intrinsic :: iso_c_binding
  use mpi_f08
  use hma
  implicit none
  real(c_double), target :: a(5, 3), d(4, 6), g(2, 1, 2, 1, 2, 1, 2), s
  real(c_float), target :: b(2, 3, 4)
  integer(c_int16_t), target :: h(3, 2)
  real(c_double), target :: strided(4, 3)
  real(c_double) :: d0(4, 6)
  integer(c_intptr_t) :: ps, avg
  integer :: rank, np, fails, all_fails, i, st
  logical :: averaged
  character(:), allocatable :: msg

  call MPI_Init()
  call MPI_Comm_rank(MPI_COMM_WORLD, rank)
  call MPI_Comm_size(MPI_COMM_WORLD, np)
  fails = 0

  a = reshape([(value(rank, i, 1), i = 0, size(a) - 1)], shape(a))
  b = reshape([(real(value(rank, i, 2), c_float), i = 0, size(b) - 1)], shape(b))
  g = reshape([(value(rank, i, 3), i = 0, size(g) - 1)], shape(g))
  s = value(rank, 0, 4)
  d = reshape([(value(rank, i, 5), i = 0, size(d) - 1)], shape(d))
  d0 = d
  h = reshape([(bf16_bits(value(rank, i, 6)), i = 0, size(h) - 1)], shape(h))
  strided = 1

  call ok(hma_paramset_create(ps), 'create')
  call ok(hma_paramset_add(ps, a), 'add 2-D')
  call ok(hma_paramset_add(ps, b), 'add 3-D')
  call ok(hma_paramset_add(ps, g), 'add 7-D')
  call ok(hma_paramset_add(ps, s), 'add scalar')
  call ok(hma_paramset_add(ps, d(:, 2:3)), 'add a contiguous section')  ! columns 2 and 3
  call ok(hma_paramset_add_bf16(ps, h), 'add 2-D bf16')
  ! A strided section (every other row) is refused, not copied into a temporary.
  st = hma_paramset_add(ps, strided(1:4:2, :))
  msg = hma_last_error()
  if (st /= HMA_ERR_INVALID_ARGUMENT .or. &
      index(msg, 'hma_paramset_add: x (6 elements) is not contiguous') == 0) then
    print '(a, i0, a, i0, 2a)', 'rank ', rank, ': strided section: status ', st, ', message: ', msg
    fails = fails + 1
  end if

  call ok(hma_averager_create_periodic(MPI_COMM_WORLD, 1, 0, avg), 'averager')
  call ok(hma_step(avg, ps, averaged), 'step')
  if (.not. averaged) fails = fails + 1
  call ok(hma_averager_free(avg), 'averager free')
  call ok(hma_paramset_free(ps), 'free')

  call expect('2-D', reshape(a, [size(a)]), 1)
  call expect('3-D', real(reshape(b, [size(b)]), c_double), 2)
  call expect('7-D', reshape(g, [size(g)]), 3)
  call expect('scalar', [s], 4)
  ! The section's columns 2 and 3 are averaged (elements 4..11 of d), the other columns are not.
  call expect('section', reshape(d(:, 2:3), [8]), 5, first=4)
  if (any(d(:, 1) /= d0(:, 1)) .or. any(d(:, 4:) /= d0(:, 4:))) then
    print '(a, i0, a)', 'rank ', rank, ': columns outside the section changed'
    fails = fails + 1
  end if
  call expect('bf16', [(bf16_value(h(mod(i, 3) + 1, i / 3 + 1)), i = 0, size(h) - 1)], 6)
  if (any(strided /= 1)) fails = fails + 1

  call MPI_Allreduce(fails, all_fails, 1, MPI_INTEGER, MPI_SUM, MPI_COMM_WORLD)
  if (rank == 0) then
    if (all_fails == 0) then
      print '(a, i0, a)', 'test_fortran: ok (', np, ' ranks)'
    else
      print '(a, i0, a)', 'test_fortran: ', all_fails, ' failures'
    end if
  end if
  call MPI_Finalize()
  if (all_fails /= 0) error stop 1
contains
  ! Element i (from 0, in array element order) of array k on rank r: np * (r + mod(i, 16) + k);
  ! the mean over ranks is np * (mod(i, 16) + k) + np * (np - 1) / 2, an integer below 256.
  real(c_double) function value(r, i, k)
    integer, intent(in) :: r, i, k
    value = np * (r + mod(i, 16) + k)
  end function
  real(c_double) function mean(i, k)
    integer, intent(in) :: i, k
    mean = np * (mod(i, 16) + k) + np * (np - 1) / 2
  end function
  integer(c_int16_t) function bf16_bits(x)  ! exact for integers below 256
    real(c_double), intent(in) :: x
    bf16_bits = int(ishft(transfer(real(x, c_float), 0_c_int32_t), -16), c_int16_t)
  end function
  real(c_double) function bf16_value(bits)
    integer(c_int16_t), intent(in) :: bits
    bf16_value = transfer(ishft(int(bits, c_int32_t), 16), 0.0_c_float)
  end function
  subroutine expect(what, got, k, first)
    character(*), intent(in) :: what
    real(c_double), intent(in) :: got(:)
    integer, intent(in) :: k
    integer, intent(in), optional :: first
    integer :: j, i0
    i0 = 0
    if (present(first)) i0 = first
    do j = 1, size(got)
      if (got(j) /= mean(i0 + j - 1, k)) then
        print '(a, i0, 3a, i0, a, f0.1, a, f0.1)', 'rank ', rank, ': ', what, ' element ', j, &
            ': got ', got(j), ', expected ', mean(i0 + j - 1, k)
        fails = fails + 1
        return
      end if
    end do
  end subroutine
  subroutine ok(status, what)
    integer, intent(in) :: status
    character(*), intent(in) :: what
    if (status /= HMA_OK) then
      print '(a, i0, 4a)', 'rank ', rank, ': ', what, ': ', hma_last_error()
      call MPI_Abort(MPI_COMM_WORLD, 1)
    end if
  end subroutine
end program
