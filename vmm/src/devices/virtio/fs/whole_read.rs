//! Reads that stop short only at the end of the file.
//!
//! FUSE gives a short read one meaning: the end of the file. The guest's kernel (with no writeback
//! cache) shrinks its size of the file to where a short reply ended, so its readers see the file
//! end there until the next attribute refresh: `tar` and containerd's importer then fail with
//! "unexpected EOF" on an intact archive. One host `preadv` may return less than asked before the
//! end (a copy into guest memory that faults part-way, a file system that reads in pieces), so a
//! read is repeated from where it stopped until the request is filled, the host says end of file
//! (0 bytes), or it fails: an error after part of the data fails the whole request (the guest
//! retries or reports it) rather than passing as an end of file.

use std::io;

/// `EINTR`s in a row after which a read gives up (a signal storm must not hold the worker).
const MAX_INTERRUPTED: u32 = 8;

/// Fills a read request of `size` bytes at `offset` with `read(size, offset)` calls (each
/// appending to the reply where the previous one stopped); returns the bytes read, fewer than
/// `size` only at the end of the file.
pub fn read_whole(
    size: u32,
    offset: u64,
    mut read: impl FnMut(u32, u64) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done: u32 = 0;
    let mut interrupted = 0;
    while done < size {
        let at =
            offset.checked_add(u64::from(done)).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        match read(size - done, at) {
            Ok(0) => break,
            Ok(n) => {
                // A reader never returns more than it was asked for; clamp rather than trust it.
                let n = u32::try_from(n).unwrap_or(u32::MAX).min(size - done);
                if done > 0 {
                    // Not the end after all: the host's first read was short before it.
                    crate::guest_log!(
                        debug,
                        size,
                        offset,
                        read_so_far = done,
                        "virtio-fs: host read came back in pieces"
                    );
                }
                done += n;
                interrupted = 0;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted && interrupted < MAX_INTERRUPTED => {
                interrupted += 1;
            }
            Err(err) => {
                if done > 0 {
                    crate::guest_log!(warn, %err, size, offset, read = done, "virtio-fs: host read failed part-way");
                }
                return Err(err);
            }
        }
    }
    Ok(done as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host file of `len` bytes whose reads return at most `piece` bytes; records the calls.
    fn pieces(
        len: u64,
        piece: u32,
        calls: &mut Vec<(u32, u64)>,
    ) -> impl FnMut(u32, u64) -> io::Result<usize> + '_ {
        move |size, offset| {
            calls.push((size, offset));
            let left = len.saturating_sub(offset);
            Ok(u64::from(size.min(piece)).min(left) as usize)
        }
    }

    #[test]
    fn a_read_returned_in_pieces_is_filled_from_where_each_stopped() {
        let mut calls = Vec::new();
        assert_eq!(read_whole(10_000, 100, pieces(1 << 20, 4096, &mut calls)).unwrap(), 10_000);
        assert_eq!(calls, vec![(10_000, 100), (5904, 4196), (1808, 8292)]);
    }

    #[test]
    fn a_read_stops_short_only_at_the_end_of_the_file() {
        let mut calls = Vec::new();
        assert_eq!(read_whole(10_000, 0, pieces(6000, 4096, &mut calls)).unwrap(), 6000);
        assert_eq!(calls.last(), Some(&(4000, 6000)), "asked on once more, and the host said end of file");
        let mut calls = Vec::new();
        assert_eq!(read_whole(4096, 8192, pieces(6000, 4096, &mut calls)).unwrap(), 0, "past the end");
    }

    #[test]
    fn a_failure_after_part_of_the_data_fails_the_request_instead_of_ending_the_file() {
        let mut first = true;
        let result = read_whole(8192, 0, |_, _| {
            if std::mem::take(&mut first) {
                Ok(4096)
            } else {
                Err(io::Error::from_raw_os_error(libc::EFAULT))
            }
        });
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EFAULT));
    }

    #[test]
    fn interruptions_are_retried_a_few_times_then_reported() {
        let mut left = 3;
        let flaky = |size: u32, _| {
            if left > 0 {
                left -= 1;
                Err(io::Error::from(io::ErrorKind::Interrupted))
            } else {
                Ok(size as usize)
            }
        };
        assert_eq!(read_whole(512, 0, flaky).unwrap(), 512);
        let endless = |_, _| Err(io::Error::from(io::ErrorKind::Interrupted));
        assert_eq!(read_whole(512, 0, endless).unwrap_err().kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn a_reader_claiming_more_than_asked_is_held_to_the_request() {
        assert_eq!(read_whole(512, 0, |_, _| Ok(1 << 20)).unwrap(), 512);
    }
}
