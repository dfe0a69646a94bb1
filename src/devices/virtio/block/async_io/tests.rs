use super::*;

fn iov(base: usize, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base as *mut libc::c_void,
        iov_len: len,
    }
}

#[test]
fn a_short_transfer_advances_past_what_was_done() {
    let mut v = [iov(0x1000, 100), iov(0x2000, 200), iov(0x3000, 300)];
    let mut first = 0;
    // Into the second buffer.
    advance(&mut v[first..], &mut first, 150);
    assert_eq!(first, 1);
    assert_eq!((v[1].iov_base as usize, v[1].iov_len), (0x2000 + 50, 150));
    // Exactly to the end of the second.
    advance(&mut v[first..], &mut first, 150);
    assert_eq!(first, 2);
    assert_eq!((v[2].iov_base as usize, v[2].iov_len), (0x3000, 300));
}

#[test]
fn user_data_names_slot_and_part() {
    for (slot, part) in [(0, 0), (1, 3), (255, 1), (70_000, 3)] {
        assert_eq!(split_user_data(user_data(slot, part)), (slot, part));
    }
}
