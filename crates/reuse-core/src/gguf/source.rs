//! Where a GGUF's bytes come from: a file read with positioned reads (no shared cursor,
//! so tensors can be read from several threads), or bytes already in memory.

use std::fs::File;
use std::io;

pub(crate) enum Source {
    File(File),
    Bytes(Vec<u8>),
}

impl Source {
    pub(crate) fn len(&self) -> io::Result<u64> {
        match self {
            Source::File(f) => Ok(f.metadata()?.len()),
            Source::Bytes(b) => Ok(b.len() as u64),
        }
    }

    /// Fills `buf` from `offset`; an error if the source ends first.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Source::File(f) => read_exact_at(f, offset, buf),
            Source::Bytes(b) => {
                let start = usize::try_from(offset).ok().filter(|&s| s <= b.len());
                match start.and_then(|s| b.get(s..s.checked_add(buf.len())?)) {
                    Some(src) => {
                        buf.copy_from_slice(src);
                        Ok(())
                    }
                    None => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the bytes",
                    )),
                }
            }
        }
    }
}

#[cfg(unix)]
fn read_exact_at(f: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(f: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match f.seek_read(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill the whole buffer",
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
