//! Copies a file into the console's images directory: checked first (what it is, that
//! qemu-img reads a qcow2's header the same way, that the copy fits), then copied sparsely
//! with its BLAKE3 computed on the way, under a temporary name until it is whole. Blocking:
//! the engine runs it off its thread.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use super::format::{Detected, FormatError, HEAD_BYTES, ImageFormat, detect};

const CHUNK_BYTES: usize = 1 << 20;

/// A file copied into the images directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub detected: Detected,
    pub blake3: String,
    /// What the copy takes on the console's storage.
    pub allocated_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a file")]
    NotAFile(PathBuf),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("qemu-img cannot read the qcow2 header: {0}")]
    Unreadable(String),
    #[error("checking a qcow2 image needs qemu-img: install the package qemu-utils")]
    NoQemuImg,
    #[error("the image needs {needed_bytes} bytes and the console's storage has {free_bytes} free")]
    NoSpace { needed_bytes: u64, free_bytes: u64 },
    #[error("writing the copy into {dir} failed")]
    Write {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks `source` and copies it into `dir` as `DIGEST.FORMAT` (kept as it is when a file
/// with those bytes is there already).
pub fn import_file(source: &Path, dir: &Path) -> Result<Copied, ImportError> {
    let read_error = |source_error| ImportError::Read {
        path: source.to_path_buf(),
        source: source_error,
    };
    let meta = std::fs::metadata(source).map_err(read_error)?;
    if !meta.is_file() {
        return Err(ImportError::NotAFile(source.to_path_buf()));
    }
    let mut file = File::open(source).map_err(read_error)?;
    let mut head = vec![0u8; HEAD_BYTES.min(meta.len() as usize)];
    file.read_exact(&mut head).map_err(read_error)?;
    let detected = detect(&head, meta.len())?;
    if detected.format == ImageFormat::Qcow2 {
        check_with_qemu_img(source)?;
    }
    let write_error = |source| ImportError::Write {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(write_error)?;
    let needed_bytes = meta.blocks() * 512;
    let free_bytes = free_bytes(dir).map_err(write_error)?;
    if needed_bytes > free_bytes {
        return Err(ImportError::NoSpace {
            needed_bytes,
            free_bytes,
        });
    }
    file.seek(SeekFrom::Start(0)).map_err(read_error)?;
    let mut copy = tempfile::Builder::new()
        .prefix(".import-")
        .tempfile_in(dir)
        .map_err(write_error)?;
    let mut hasher = blake3::Hasher::new();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        let n = read_full(&mut file, &mut chunk).map_err(read_error)?;
        if n == 0 {
            break;
        }
        let data = &chunk[..n];
        hasher.update(data);
        // Runs of zeros stay holes in the copy.
        if data.iter().all(|b| *b == 0) {
            copy.as_file_mut()
                .seek(SeekFrom::Current(n as i64))
                .map_err(write_error)?;
        } else {
            copy.as_file_mut().write_all(data).map_err(write_error)?;
        }
    }
    copy.as_file_mut()
        .set_len(meta.len())
        .map_err(write_error)?;
    copy.as_file_mut().sync_all().map_err(write_error)?;
    let blake3 = hasher.finalize().to_hex().to_string();
    let target = dir.join(format!("{blake3}.{}", detected.format.as_str()));
    if !target.exists() {
        copy.persist(&target).map_err(|e| write_error(e.error))?;
    }
    let allocated_bytes = std::fs::metadata(&target).map_err(write_error)?.blocks() * 512;
    Ok(Copied {
        detected,
        blake3,
        allocated_bytes,
    })
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// What the file system holding `dir` has free for this user.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// qemu-img must read the header as a plain qcow2 too: a header it cannot read, or one
/// through which it finds a backing or data file, is refused.
fn check_with_qemu_img(source: &Path) -> Result<(), ImportError> {
    let output = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(source)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImportError::NoQemuImg,
            _ => ImportError::Unreadable(e.to_string()),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no reason given")
            .trim_start_matches("qemu-img: ")
            .to_string();
        return Err(ImportError::Unreadable(line));
    }
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| ImportError::Unreadable(e.to_string()))?;
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(FormatError::BackingFile(backing.to_string()).into());
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return Err(FormatError::ExternalData.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw disk of `bytes` with a partition table's signature and some data.
    fn raw_disk(path: &Path, bytes: u64) {
        let mut f = File::create(path).unwrap();
        f.set_len(bytes).unwrap();
        f.seek(SeekFrom::Start(510)).unwrap();
        f.write_all(&[0x55, 0xaa]).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
    }

    #[test]
    fn a_copy_keeps_the_bytes_and_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("disk.img");
        raw_disk(&source, 64 << 20);
        let images = dir.path().join("images");
        let copied = import_file(&source, &images).unwrap();
        assert_eq!(copied.detected.format, ImageFormat::Raw);
        assert_eq!(copied.detected.virtual_bytes, 64 << 20);
        let bytes = std::fs::read(&source).unwrap();
        assert_eq!(copied.blake3, blake3::hash(&bytes).to_hex().to_string());
        let copy = images.join(format!("{}.raw", copied.blake3));
        assert_eq!(std::fs::read(&copy).unwrap(), bytes);
        // 64 MiB of which two blocks hold data.
        assert!(
            copied.allocated_bytes < 4 << 20,
            "{}",
            copied.allocated_bytes
        );
        // The same bytes again: the copy stays, no temporary file is left.
        assert_eq!(import_file(&source, &images).unwrap(), copied);
        let names: Vec<_> = std::fs::read_dir(&images).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn what_is_no_image_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("notes.txt");
        std::fs::write(&source, "not a disk").unwrap();
        let images = dir.path().join("images");
        assert!(matches!(
            import_file(&source, &images),
            Err(ImportError::Format(FormatError::NotAnImage))
        ));
        assert!(matches!(
            import_file(dir.path(), &images),
            Err(ImportError::NotAFile(_))
        ));
        assert!(matches!(
            import_file(&dir.path().join("missing"), &images),
            Err(ImportError::Read { .. })
        ));
        assert!(!images.exists());
    }
}
