//! What of a disk image crosses the wire (agent to agent, and console to agent): its allocated extents (from `SEEK_DATA` and
//! `SEEK_HOLE`, so holes never travel), cut into chunks that each carry a BLAKE3 hash, and a
//! digest of the whole image made from the chunk list, which both ends compute the same way.

use std::{fs::File, io, os::unix::fs::FileExt};

/// Chunks are at most this long; a cut link resends at most one.
pub const CHUNK_BYTES: u64 = 1024 * 1024;

/// A run of allocated bytes: `(offset, length)`.
pub type Extent = (u64, u64);

/// One chunk as both ends record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

impl ChunkRecord {
    /// The 44 bytes a chunk list is made of (also its on-disk form on the target).
    pub fn to_bytes(&self) -> [u8; 44] {
        let mut out = [0u8; 44];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..].copy_from_slice(&self.hash);
        out
    }

    pub fn from_bytes(bytes: &[u8; 44]) -> Self {
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&bytes[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[8..12]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[12..]);
        ChunkRecord {
            offset: u64::from_le_bytes(offset),
            len: u32::from_le_bytes(len),
            hash,
        }
    }

    /// Saturating: an offset from the network must not overflow (the bounds check refuses it).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// The allocated extents of `file`, in order. A file system that cannot tell data from holes
/// gives the whole file as one extent (correct, only not sparse).
pub fn allocated_extents(file: &File) -> io::Result<Vec<Extent>> {
    use rustix::fs::{SeekFrom, seek};
    let len = file.metadata()?.len();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < len {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data past `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                return Ok(if len == 0 { Vec::new() } else { vec![(0, len)] });
            }
            Err(e) => return Err(e.into()),
        };
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(e) => return Err(e.into()),
        };
        if hole > data {
            extents.push((data, hole - data));
        }
        at = hole.max(data + 1);
    }
    Ok(extents)
}

/// The chunks of `extents`, each at most [`CHUNK_BYTES`], in order.
pub fn chunks_of(extents: &[Extent]) -> Vec<(u64, u32)> {
    let mut chunks = Vec::new();
    for &(offset, len) in extents {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = CHUNK_BYTES.min(end - at);
            chunks.push((at, n as u32));
            at += n;
        }
    }
    chunks
}

/// Reads one chunk and hashes it.
pub fn read_chunk(file: &File, offset: u64, len: u32) -> io::Result<(Vec<u8>, ChunkRecord)> {
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset)?;
    let hash = *blake3::hash(&data).as_bytes();
    Ok((data, ChunkRecord { offset, len, hash }))
}

/// The digest of a whole image: its size, then every chunk record in order. Holes are zero on
/// both ends by construction, so the records say everything the image holds.
pub fn image_digest(size: u64, chunks: &[ChunkRecord]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"dunes-image-1");
    hasher.update(&size.to_le_bytes());
    for c in chunks {
        hasher.update(&c.to_bytes());
    }
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn only_allocated_extents_are_listed_and_cut_into_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let mut f = File::create(&path).unwrap();
        // 64 MiB virtual, 3 MiB of data at 8 MiB and 1 page at the very end.
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![7u8; 3 << 20]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 4096)).unwrap();
        f.write_all(&[9u8; 4096]).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        let extents = allocated_extents(&f).unwrap();
        let total: u64 = extents.iter().map(|e| e.1).sum();
        // The file system may round to its blocks, never to the whole 64 MiB.
        assert!(((3 << 20) + 4096..8 << 20).contains(&total), "{extents:?}");
        assert!(
            extents
                .iter()
                .any(|&(o, l)| o <= 8 << 20 && o + l >= 11 << 20)
        );
        let chunks = chunks_of(&extents);
        assert!(chunks.iter().all(|&(_, l)| u64::from(l) <= CHUNK_BYTES));
        assert_eq!(
            chunks.iter().map(|&(_, l)| u64::from(l)).sum::<u64>(),
            total
        );
        let (data, record) = read_chunk(&f, chunks[0].0, chunks[0].1).unwrap();
        assert_eq!(record.hash, *blake3::hash(&data).as_bytes());
        assert_eq!(ChunkRecord::from_bytes(&record.to_bytes()), record);
    }

    #[test]
    fn an_empty_or_all_hole_file_has_no_extents_and_digests_differ_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holes.raw");
        let f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        assert!(allocated_extents(&f).unwrap().is_empty());
        let a = ChunkRecord {
            offset: 0,
            len: 4,
            hash: [1; 32],
        };
        let b = ChunkRecord { hash: [2; 32], ..a };
        assert_ne!(image_digest(16, &[a]), image_digest(16, &[b]));
        assert_ne!(image_digest(16, &[a]), image_digest(32, &[a]));
        assert_eq!(image_digest(16, &[a]), image_digest(16, &[a]));
    }
}
