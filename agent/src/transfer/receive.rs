//! The target's side of a disk transfer: chunks are checked against their hash before they
//! are written (a corrupt chunk is never written), land in `NAME.transfer` beside the disks,
//! and are recorded in `NAME.transfer.chunks` once synced, so that a cut link resumes from the
//! last acknowledged chunk. Only when the chunks an earlier try left read back with their
//! hashes and the image digest matches the source's is the file renamed to its real name.
//! (A chunk this try wrote was hashed from the very bytes written; reading the whole image
//! back would cost a second pass over it during the VM's downtime, and the migration's
//! verifying step hashes both ends' files anyway.)

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use super::extents::{ChunkRecord, image_digest};

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("chunk at {offset} does not match its hash; it was not written")]
    Corrupt { offset: u64 },
    #[error("chunk at {offset} is out of order (expected at or after {expected})")]
    OutOfOrder { offset: u64, expected: u64 },
    #[error("chunk at {offset} ends past the image's {size} bytes")]
    OutOfBounds { offset: u64, size: u64 },
    #[error("the copy does not match the source (image digest differs)")]
    DigestMismatch,
    #[error("chunk at {offset} reads back differently from what was written")]
    ReadBack { offset: u64 },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReceiveError {
    let path = path.display().to_string();
    move |source| ReceiveError::Io {
        action,
        path,
        source,
    }
}

/// A transfer being received into `dir`.
#[derive(Debug)]
pub struct Receiving {
    final_path: PathBuf,
    tmp_path: PathBuf,
    journal_path: PathBuf,
    size: u64,
    tmp: File,
    journal: File,
    /// Every chunk written and synced so far (the journal's content).
    acknowledged: Vec<ChunkRecord>,
    /// How many of `acknowledged` an earlier try wrote: read back before the rename.
    inherited: usize,
    /// Written since the last checkpoint, not yet in the journal.
    pending: Vec<ChunkRecord>,
}

impl Receiving {
    /// The partial files of `file_name` in `dir`.
    pub fn partial_paths(dir: &Path, file_name: &str) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{file_name}.transfer")),
            dir.join(format!("{file_name}.transfer.chunks")),
        )
    }

    /// Opens (or picks up) the transfer of `file_name`, an image of `size` bytes. What an
    /// earlier try acknowledged is kept; the transfer goes on from [`Self::resume_from`].
    pub fn open(dir: &Path, file_name: &str, size: u64) -> Result<Self, ReceiveError> {
        let (tmp_path, journal_path) = Self::partial_paths(dir, file_name);
        let tmp = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp_path)
            .map_err(io("opening", &tmp_path))?;
        let mut journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&journal_path)
            .map_err(io("opening", &journal_path))?;
        let mut bytes = Vec::new();
        journal
            .read_to_end(&mut bytes)
            .map_err(io("reading", &journal_path))?;
        // A record cut by a crash is not acknowledged: it goes, and its chunk comes again.
        let whole = bytes.len() / 44 * 44;
        if whole != bytes.len() {
            journal
                .set_len(whole as u64)
                .map_err(io("trimming", &journal_path))?;
        }
        let acknowledged: Vec<ChunkRecord> = bytes[..whole]
            .chunks_exact(44)
            .map(|c| ChunkRecord::from_bytes(c.try_into().expect("44 bytes")))
            .collect();
        // A different image size means a different image: start over.
        let acknowledged = if tmp.metadata().map_err(io("reading", &tmp_path))?.len() == size {
            acknowledged
        } else {
            journal.set_len(0).map_err(io("trimming", &journal_path))?;
            tmp.set_len(0).map_err(io("sizing", &tmp_path))?;
            tmp.set_len(size).map_err(io("sizing", &tmp_path))?;
            Vec::new()
        };
        Ok(Receiving {
            final_path: dir.join(file_name),
            tmp_path,
            journal_path,
            size,
            tmp,
            journal,
            inherited: acknowledged.len(),
            acknowledged,
            pending: Vec::new(),
        })
    }

    /// Where the source goes on from: the end of the last acknowledged chunk.
    pub fn resume_from(&self) -> u64 {
        self.acknowledged.last().map_or(0, |c| c.end())
    }

    fn written_through(&self) -> u64 {
        self.pending
            .last()
            .or(self.acknowledged.last())
            .map_or(0, |c| c.end())
    }

    /// Checks a chunk against its hash and writes it.
    pub fn write_chunk(&mut self, record: ChunkRecord, data: &[u8]) -> Result<(), ReceiveError> {
        let expected = self.written_through();
        if record.offset < expected {
            return Err(ReceiveError::OutOfOrder {
                offset: record.offset,
                expected,
            });
        }
        if record.end() > self.size || data.len() != record.len as usize {
            return Err(ReceiveError::OutOfBounds {
                offset: record.offset,
                size: self.size,
            });
        }
        if *blake3::hash(data).as_bytes() != record.hash {
            return Err(ReceiveError::Corrupt {
                offset: record.offset,
            });
        }
        self.tmp
            .write_all_at(data, record.offset)
            .map_err(io("writing", &self.tmp_path))?;
        self.pending.push(record);
        Ok(())
    }

    /// Syncs what was written, then records it: returns the offset acknowledged to the source.
    pub fn checkpoint(&mut self) -> Result<u64, ReceiveError> {
        if self.pending.is_empty() {
            return Ok(self.resume_from());
        }
        self.tmp
            .sync_data()
            .map_err(io("syncing", &self.tmp_path))?;
        let mut bytes = Vec::with_capacity(self.pending.len() * 44);
        for r in &self.pending {
            bytes.extend_from_slice(&r.to_bytes());
        }
        self.journal
            .write_all(&bytes)
            .map_err(io("writing", &self.journal_path))?;
        self.journal
            .sync_data()
            .map_err(io("syncing", &self.journal_path))?;
        self.acknowledged.append(&mut self.pending);
        Ok(self.resume_from())
    }

    /// Reads back the chunks an earlier try wrote, checks the image digest against the
    /// source's, and only then gives the image its real name.
    pub fn finish(mut self, source_digest: &[u8; 32]) -> Result<PathBuf, ReceiveError> {
        self.checkpoint()?;
        let mut buf = Vec::new();
        for record in &self.acknowledged[..self.inherited] {
            buf.resize(record.len as usize, 0);
            self.tmp
                .read_exact_at(&mut buf, record.offset)
                .map_err(io("reading back", &self.tmp_path))?;
            if *blake3::hash(&buf).as_bytes() != record.hash {
                return Err(ReceiveError::ReadBack {
                    offset: record.offset,
                });
            }
        }
        if image_digest(self.size, &self.acknowledged) != *source_digest {
            return Err(ReceiveError::DigestMismatch);
        }
        self.tmp.sync_all().map_err(io("syncing", &self.tmp_path))?;
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(io("renaming", &self.tmp_path))?;
        let _ = std::fs::remove_file(&self.journal_path);
        if let Some(dir) = self.final_path.parent() {
            dunes_shared::durable::sync_dir(dir).map_err(io("syncing", dir))?;
        }
        Ok(self.final_path)
    }

    /// Removes what a transfer of `file_name` left in `dir` (a rollback).
    pub fn abandon(dir: &Path, file_name: &str) {
        let (tmp, journal) = Self::partial_paths(dir, file_name);
        let _ = std::fs::remove_file(tmp);
        let _ = std::fs::remove_file(journal);
    }
}

#[cfg(test)]
mod tests {
    use super::super::extents::{allocated_extents, chunks_of, read_chunk};
    use super::*;
    use std::io::{Seek, SeekFrom};

    /// A 32 MiB sparse image with 5 MiB of varied data.
    fn source(dir: &Path) -> PathBuf {
        let path = dir.join("src.raw");
        let mut f = File::create(&path).unwrap();
        f.set_len(32 << 20).unwrap();
        for (at, n) in [(1u64 << 20, 2u64 << 20), (20 << 20, 3 << 20)] {
            f.seek(SeekFrom::Start(at)).unwrap();
            let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            f.write_all(&data).unwrap();
        }
        f.sync_all().unwrap();
        path
    }

    fn records(path: &Path) -> (File, Vec<ChunkRecord>) {
        let f = File::open(path).unwrap();
        let chunks = chunks_of(&allocated_extents(&f).unwrap());
        let records = chunks
            .iter()
            .map(|&(o, l)| read_chunk(&f, o, l).unwrap().1)
            .collect();
        (f, records)
    }

    #[test]
    fn a_cut_transfer_resumes_from_the_last_acknowledged_chunk_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let target = dir.path().join("disks");
        std::fs::create_dir_all(&target).unwrap();
        let (f, all) = records(&src);
        let size = 32 << 20;
        let digest = image_digest(size, &all);

        // First try: half the chunks, a checkpoint, one more written but not acknowledged.
        let half = all.len() / 2;
        let mut rx = Receiving::open(&target, "vm.raw", size).unwrap();
        for r in &all[..half] {
            let (data, _) = read_chunk(&f, r.offset, r.len).unwrap();
            rx.write_chunk(*r, &data).unwrap();
        }
        let acked = rx.checkpoint().unwrap();
        let (data, _) = read_chunk(&f, all[half].offset, all[half].len).unwrap();
        rx.write_chunk(all[half], &data).unwrap();
        drop(rx);

        // Second try: goes on from the acknowledged offset, never from zero.
        let mut rx = Receiving::open(&target, "vm.raw", size).unwrap();
        assert_eq!(rx.resume_from(), acked);
        assert!(acked > 0);
        for r in all.iter().filter(|r| r.offset >= acked) {
            let (data, _) = read_chunk(&f, r.offset, r.len).unwrap();
            rx.write_chunk(*r, &data).unwrap();
        }
        let done = rx.finish(&digest).unwrap();
        assert_eq!(std::fs::read(&done).unwrap(), std::fs::read(&src).unwrap());
        assert!(!target.join("vm.raw.transfer").exists());
        assert!(!target.join("vm.raw.transfer.chunks").exists());
        // Sparse on the target too: far less allocated than the image's size.
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&done).unwrap()) * 512;
        assert!(allocated < 12 << 20, "{allocated}");
    }

    #[test]
    fn a_chunk_an_earlier_try_left_is_read_back_before_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let (f, all) = records(&src);
        let size = 32 << 20;
        let digest = image_digest(size, &all);
        let mut rx = Receiving::open(dir.path(), "vm.raw", size).unwrap();
        let (data, _) = read_chunk(&f, all[0].offset, all[0].len).unwrap();
        rx.write_chunk(all[0], &data).unwrap();
        rx.checkpoint().unwrap();
        drop(rx);
        // Between the tries the partial file changes under the acknowledged chunk.
        let tmp = OpenOptions::new()
            .write(true)
            .open(dir.path().join("vm.raw.transfer"))
            .unwrap();
        tmp.write_all_at(&[!data[5]], all[0].offset + 5).unwrap();
        let mut rx = Receiving::open(dir.path(), "vm.raw", size).unwrap();
        for r in &all[1..] {
            let (data, _) = read_chunk(&f, r.offset, r.len).unwrap();
            rx.write_chunk(*r, &data).unwrap();
        }
        assert!(matches!(
            rx.finish(&digest),
            Err(ReceiveError::ReadBack { offset }) if offset == all[0].offset
        ));
        assert!(!dir.path().join("vm.raw").exists());
    }

    #[test]
    fn a_corrupt_chunk_is_never_written_and_a_wrong_image_is_never_named() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let (f, all) = records(&src);
        let size = 32 << 20;
        let mut rx = Receiving::open(dir.path(), "vm.raw", size).unwrap();
        let (mut data, _) = read_chunk(&f, all[0].offset, all[0].len).unwrap();
        data[10] ^= 0xff;
        assert!(matches!(
            rx.write_chunk(all[0], &data),
            Err(ReceiveError::Corrupt { .. })
        ));
        let mut check = vec![0u8; 16];
        rx.tmp.read_exact_at(&mut check, all[0].offset).unwrap();
        assert_eq!(check, vec![0u8; 16], "nothing of it landed");
        // Everything right but the digest: the file keeps its temporary name.
        for r in &all {
            let (data, _) = read_chunk(&f, r.offset, r.len).unwrap();
            rx.write_chunk(*r, &data).unwrap();
        }
        assert!(matches!(
            rx.finish(&[0u8; 32]),
            Err(ReceiveError::DigestMismatch)
        ));
        assert!(!dir.path().join("vm.raw").exists());
        Receiving::abandon(dir.path(), "vm.raw");
        assert!(!dir.path().join("vm.raw.transfer").exists());
    }
}
