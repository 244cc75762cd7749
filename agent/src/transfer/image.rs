//! A disk as the transfer reads it: a file as it is (a raw image, or a qcow2 overlay that
//! moves as an overlay), or the raw image a qcow2 overlay shows its guest, read through the
//! allocation map `qemu-img map` gives: each allocated run comes from the overlay or from its
//! template's image, and what neither holds is a hole. Either way the transfer sees the
//! allocated extents of one image and reads chunks of it.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;

use super::extents::{ChunkRecord, Extent, allocated_extents, chunks_of, image_digest};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "qemu-img is needed to flatten an overlay and is not installed (apt-get install qemu-utils)"
    )]
    NoQemuImg,
    #[error("qemu-img {action} {path}: {message}")]
    QemuImg {
        action: &'static str,
        path: String,
        message: String,
    },
    #[error("{0}")]
    Unreadable(String),
}

/// A run of the image: `len` bytes at `start` are read from `files[file]` at `file_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    start: u64,
    len: u64,
    file: usize,
    file_offset: u64,
}

/// One image's size, allocated runs and where their bytes are.
#[derive(Debug)]
pub struct DiskImage {
    size: u64,
    files: Vec<File>,
    segments: Vec<Segment>,
}

impl DiskImage {
    /// The file as it is: its allocated extents, read in place.
    pub fn file(path: &Path) -> Result<Self, ImageError> {
        let err = io_error(path);
        let file = File::open(path).map_err(&err)?;
        let size = file.metadata().map_err(&err)?.len();
        let segments = allocated_extents(&file)
            .map_err(&err)?
            .into_iter()
            .map(|(start, len)| Segment {
                start,
                len,
                file: 0,
                file_offset: start,
            })
            .collect();
        Ok(DiskImage {
            size,
            files: vec![file],
            segments,
        })
    }

    /// What the guest of the qcow2 overlay at `path` sees, as one raw image. Every file of
    /// its backing chain must lie inside `confine` (the agent's storage directory).
    pub fn flattened(path: &Path, confine: &Path) -> Result<Self, ImageError> {
        let chain: Vec<ChainEntry> = qemu_img_json(
            "info",
            &["info", "--output=json", "--backing-chain", "-f", "qcow2"],
            path,
        )?;
        let map: Vec<MapEntry> =
            qemu_img_json("map", &["map", "--output=json", "-f", "qcow2"], path)?;
        let confine = confine.canonicalize().map_err(io_error(confine))?;
        let mut files = Vec::new();
        for entry in &chain {
            let file_path = PathBuf::from(&entry.filename);
            let real = file_path.canonicalize().map_err(io_error(&file_path))?;
            if !real.starts_with(&confine) {
                return Err(ImageError::Unreadable(format!(
                    "{} is backed by {}, outside the storage directory",
                    path.display(),
                    real.display()
                )));
            }
            files.push(File::open(&real).map_err(io_error(&real))?);
        }
        let size = chain.first().map_or(0, |e| e.virtual_size);
        let mut segments: Vec<Segment> = Vec::new();
        for run in map {
            // Zero runs and holes read as zeros: nothing to send.
            if !run.data || run.zero {
                continue;
            }
            let (Some(file_offset), Some(_)) = (run.offset, files.get(run.depth)) else {
                return Err(ImageError::Unreadable(format!(
                    "{} has data at {} that is not stored plainly (compressed or encrypted); it cannot be flattened here",
                    path.display(),
                    run.start
                )));
            };
            if run
                .start
                .checked_add(run.length)
                .is_none_or(|end| end > size)
            {
                return Err(ImageError::Unreadable(format!(
                    "qemu-img map of {} runs past the image's end",
                    path.display()
                )));
            }
            segments.push(Segment {
                start: run.start,
                len: run.length,
                file: run.depth,
                file_offset,
            });
        }
        segments.sort_by_key(|s| s.start);
        if segments
            .windows(2)
            .any(|w| w[0].start + w[0].len > w[1].start)
        {
            return Err(ImageError::Unreadable(format!(
                "qemu-img map of {} has overlapping runs",
                path.display()
            )));
        }
        Ok(DiskImage {
            size,
            files,
            segments,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The allocated extents, adjacent runs joined and widened to whole 4 KiB blocks (within
    /// the image): what `SEEK_DATA` finds in the raw file a transfer of this image writes, so
    /// both ends cut the same chunks. The widening reads as zeros where no run is.
    pub fn extents(&self) -> Vec<Extent> {
        const BLOCK: u64 = 4096;
        let mut out: Vec<Extent> = Vec::new();
        for s in &self.segments {
            let start = s.start - s.start % BLOCK;
            let end = (s.start + s.len)
                .div_ceil(BLOCK)
                .saturating_mul(BLOCK)
                .min(self.size);
            if end <= start {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 >= start => {
                    last.1 = last.1.max(end - last.0);
                }
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Reads `len` bytes at `offset` of the image and hashes them.
    pub fn read_chunk(&self, offset: u64, len: u32) -> io::Result<(Vec<u8>, ChunkRecord)> {
        let mut data = vec![0u8; len as usize];
        let end = offset + u64::from(len);
        let first = self.segments.partition_point(|s| s.start + s.len <= offset);
        for s in &self.segments[first..] {
            if s.start >= end {
                break;
            }
            let from = s.start.max(offset);
            let to = (s.start + s.len).min(end);
            if to <= from {
                continue;
            }
            let buf = &mut data[(from - offset) as usize..(to - offset) as usize];
            self.files[s.file].read_exact_at(buf, s.file_offset + (from - s.start))?;
        }
        let hash = *blake3::hash(&data).as_bytes();
        Ok((data, ChunkRecord { offset, len, hash }))
    }

    /// The image digest, as the transfer computes it.
    pub fn digest(&self) -> io::Result<[u8; 32]> {
        let mut records = Vec::new();
        for (offset, len) in chunks_of(&self.extents()) {
            records.push(self.read_chunk(offset, len)?.1);
        }
        Ok(image_digest(self.size, &records))
    }
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One image of `qemu-img info --backing-chain`, the overlay first.
#[derive(Debug, Deserialize)]
struct ChainEntry {
    filename: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

/// One run of `qemu-img map`: `depth` 0 is the overlay, 1 its backing file, and so on;
/// `offset` is where the run's bytes are in that file.
#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: usize,
    zero: bool,
    data: bool,
    offset: Option<u64>,
}

fn qemu_img_json<T: serde::de::DeserializeOwned>(
    action: &'static str,
    args: &[&str],
    path: &Path,
) -> Result<T, ImageError> {
    let failed = |message: String| ImageError::QemuImg {
        action,
        path: path.display().to_string(),
        message,
    };
    let output = Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NoQemuImg,
            _ => failed(e.to_string()),
        })?;
    if !output.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn qemu(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    #[test]
    fn a_flattened_overlay_reads_as_the_image_qemu_img_converts_it_to() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            // Loud: CI installs qemu-utils with the tiny guest's recipe.
            panic!("qemu-img is needed for this test: apt-get install qemu-utils");
        }
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images/base");
        let disks = dir.path().join("disks");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&disks).unwrap();
        // A 24 MiB template with 1.5 MiB of data at 4 MiB, and 8 KiB at 20 MiB.
        let base = images.join("disk.img");
        let mut f = File::create(&base).unwrap();
        f.set_len(24 << 20).unwrap();
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&vec![0x11u8; 3 << 19]).unwrap();
        f.seek(SeekFrom::Start(20 << 20)).unwrap();
        f.write_all(&[0x22u8; 8192]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let overlay = disks.join("vm.qcow2");
        let ov = overlay.to_str().unwrap();
        qemu(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "../images/base/disk.img",
            ov,
        ]);
        // The guest writes over the template's data, next to it, and in a hole.
        qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 5M 64k", ov]);
        qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 6M 128k", ov]);
        qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 12M 64k", ov]);

        let image = DiskImage::flattened(&overlay, dir.path()).unwrap();
        assert_eq!(image.size(), 24 << 20);
        let allocated: u64 = image.extents().iter().map(|e| e.1).sum();
        // The template's data and the overlay's clusters, not the whole 24 MiB.
        assert!(allocated >= (3 << 19) + 8192 + (64 << 10), "{allocated}");
        assert!(allocated < 4 << 20, "{allocated}");

        // Written out as a transfer would, it is what qemu-img makes of the overlay.
        let flat = disks.join("flat.img");
        let out = File::create(&flat).unwrap();
        out.set_len(image.size()).unwrap();
        for (offset, len) in chunks_of(&image.extents()) {
            let (data, _) = image.read_chunk(offset, len).unwrap();
            out.write_all_at(&data, offset).unwrap();
        }
        drop(out);
        let reference = disks.join("reference.img");
        qemu(&[
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            ov,
            reference.to_str().unwrap(),
        ]);
        assert!(std::fs::read(&flat).unwrap() == std::fs::read(&reference).unwrap());
        // And the written file digests as the image does, as the target's HashDisk would.
        assert_eq!(
            DiskImage::file(&flat).unwrap().digest().unwrap(),
            image.digest().unwrap()
        );

        // A backing file outside the storage directory is refused.
        let outside = tempfile::tempdir().unwrap();
        let stray = outside.path().join("vm.qcow2");
        qemu(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            base.to_str().unwrap(),
            stray.to_str().unwrap(),
        ]);
        let err = DiskImage::flattened(&stray, outside.path()).unwrap_err();
        assert!(
            err.to_string().contains("outside the storage directory"),
            "{err}"
        );
    }
}
