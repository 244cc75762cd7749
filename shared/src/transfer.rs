//! Disk streams between agents (`dunes-transfer/1`): the one-time ticket the console gives
//! both ends, and the frames of a transfer. A transfer is one bidirectional stream: the source
//! opens it with the ticket, the target answers where to go on from, chunks flow one way and
//! acknowledgements (or a request to send a chunk again) the other, and the source's image
//! digest closes it. Bulk data never shares a connection with control requests.

use serde::{Deserialize, Serialize};

use crate::model::{HostId, TemplateDisk, VmName};

/// ALPN of agent-to-agent disk transfers.
pub const ALPN_TRANSFER: &[u8] = b"dunes-transfer/1";

/// A transfer the console allowed: which VM's disk, from which host to which, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferTicket {
    /// 32 hex digits from the console's random source; used once.
    pub id: String,
    pub vm: VmName,
    pub source: HostId,
    pub target: HostId,
    pub expires_unix_secs: u64,
    /// Set when the disk moves as a qcow2 overlay on this template image, which the target
    /// holds too; otherwise the disk moves as a whole raw image (an overlay flattened).
    #[serde(default)]
    pub overlay_on: Option<TemplateDisk>,
}

impl TransferTicket {
    /// Whether `id` looks like a ticket id (it is looked up as it is, never used in a path).
    pub fn valid_id(id: &str) -> bool {
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// The frames of a transfer stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TransferFrame {
    /// Source → target: the ticket and the image's size in bytes, and whether it would send
    /// zstd chunks.
    Open {
        ticket: String,
        vm: VmName,
        size: u64,
        #[serde(default)]
        zstd: bool,
    },
    /// Target → source: go on from this offset (0 for a new transfer), and whether zstd
    /// chunks may come (an older target says nothing: no).
    Accepted {
        resume_from: u64,
        #[serde(default)]
        zstd: bool,
    },
    /// Target → source: no transfer; the stream ends.
    Refused { reason: String },
    /// Source → target: allocated bytes at `offset`, with their BLAKE3 hash.
    Chunk {
        offset: u64,
        #[serde(with = "serde_bytes")]
        hash: Vec<u8>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Source → target: as `Chunk`, its data compressed with zstd; the hash is of the data
    /// as it is on disk. Sent only to a target that accepted zstd.
    ZstdChunk {
        offset: u64,
        #[serde(with = "serde_bytes")]
        hash: Vec<u8>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Target → source: the chunk at `offset` did not match its hash; send it again.
    Resend { offset: u64 },
    /// Target → source: everything before `through` is on disk.
    Ack { through: u64 },
    /// Source → target: every chunk is sent; the digest of the whole image.
    Finish {
        #[serde(with = "serde_bytes")]
        digest: Vec<u8>,
    },
    /// Target → source: the image verified and has its name, or why not.
    Finished { ok: bool, detail: String },
}

/// A chunk frame read in place: what [`TransferFrame::Chunk`] and
/// [`TransferFrame::ZstdChunk`] carry, borrowed from the received payload so that a
/// megabyte of data is not copied once more. Any other frame does not decode as this.
#[derive(Debug, PartialEq, Deserialize)]
pub enum ChunkFrameRef<'a> {
    Chunk {
        offset: u64,
        #[serde(borrow, with = "serde_bytes")]
        hash: &'a [u8],
        #[serde(borrow, with = "serde_bytes")]
        data: &'a [u8],
    },
    ZstdChunk {
        offset: u64,
        #[serde(borrow, with = "serde_bytes")]
        hash: &'a [u8],
        #[serde(borrow, with = "serde_bytes")]
        data: &'a [u8],
    },
}

/// The bytes of a chunk frame up to its data, length prefix included: followed by the
/// `data_len` bytes of data, they are exactly the frame of [`TransferFrame::Chunk`] (or
/// `ZstdChunk` when `zstd`), so the data goes to the stream as it is, never copied into a
/// frame buffer.
pub fn chunk_frame_head(zstd: bool, offset: u64, hash: &[u8], data_len: usize) -> Vec<u8> {
    use rmp::encode::{write_bin, write_bin_len, write_map_len, write_str, write_uint};
    let mut out = vec![0u8; 4];
    // Writing into a Vec cannot fail.
    let _ = write_map_len(&mut out, 1);
    let _ = write_str(&mut out, if zstd { "ZstdChunk" } else { "Chunk" });
    let _ = write_map_len(&mut out, 3);
    let _ = write_str(&mut out, "offset");
    let _ = write_uint(&mut out, offset);
    let _ = write_str(&mut out, "hash");
    let _ = write_bin(&mut out, hash);
    let _ = write_str(&mut out, "data");
    let _ = write_bin_len(&mut out, data_len as u32);
    let frame_len = (out.len() - 4 + data_len) as u32;
    out[..4].copy_from_slice(&frame_len.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_payload, encode_payload};

    #[test]
    fn golden_frames() {
        let vm = VmName::new("web").unwrap();
        let all: Vec<(TransferFrame, &str)> = vec![
            (
                TransferFrame::Open {
                    ticket: "ab".into(),
                    vm: vm.clone(),
                    size: 5,
                    zstd: true,
                },
                "81a44f70656e84a67469636b6574a26162a2766da3776562a473697a6505a47a737464c3",
            ),
            (
                TransferFrame::Accepted {
                    resume_from: 7,
                    zstd: true,
                },
                "81a8416363657074656482ab726573756d655f66726f6d07a47a737464c3",
            ),
            (
                TransferFrame::Refused {
                    reason: "no".into(),
                },
                "81a75265667573656481a6726561736f6ea26e6f",
            ),
            (
                TransferFrame::Chunk {
                    offset: 1,
                    hash: vec![2],
                    data: vec![3, 4],
                },
                "81a54368756e6b83a66f666673657401a468617368c40102a464617461c4020304",
            ),
            (
                TransferFrame::ZstdChunk {
                    offset: 1,
                    hash: vec![2],
                    data: vec![3, 4],
                },
                "81a95a7374644368756e6b83a66f666673657401a468617368c40102a464617461c4020304",
            ),
            (
                TransferFrame::Resend { offset: 9 },
                "81a6526573656e6481a66f666673657409",
            ),
            (
                TransferFrame::Ack { through: 10 },
                "81a341636b81a77468726f7567680a",
            ),
            (
                TransferFrame::Finish { digest: vec![5] },
                "81a646696e69736881a6646967657374c40105",
            ),
            (
                TransferFrame::Finished {
                    ok: true,
                    detail: "d".into(),
                },
                "81a846696e697368656482a26f6bc3a664657461696ca164",
            ),
        ];
        assert_eq!(
            all.len(),
            crate::codec::enum_variants::<TransferFrame>().len()
        );
        for (frame, hex_bytes) in &all {
            let bytes = encode_payload(frame).unwrap();
            assert_eq!(
                hex::encode(&bytes),
                *hex_bytes,
                "encoding of {frame:?} changed"
            );
            let back: TransferFrame = decode_payload(&bytes).unwrap();
            assert_eq!(&back, frame);
        }
        // An older peer's opening and acceptance, without zstd: read as "no zstd".
        let old_open: TransferFrame = decode_payload(
            &hex::decode("81a44f70656e83a67469636b6574a26162a2766da3776562a473697a6505").unwrap(),
        )
        .unwrap();
        assert!(matches!(old_open, TransferFrame::Open { zstd: false, .. }));
        let old_accepted: TransferFrame = decode_payload(
            &hex::decode("81a8416363657074656481ab726573756d655f66726f6d07").unwrap(),
        )
        .unwrap();
        assert_eq!(
            old_accepted,
            TransferFrame::Accepted {
                resume_from: 7,
                zstd: false
            }
        );
        // A chunk's head and its data are the frame; the frame reads back in place.
        for zstd in [false, true] {
            for (offset, len) in [(0u64, 0usize), (1, 2), (300, 255), (1 << 40, 70_000)] {
                let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let hash = vec![7u8; 32];
                let frame = if zstd {
                    TransferFrame::ZstdChunk {
                        offset,
                        hash: hash.clone(),
                        data: data.clone(),
                    }
                } else {
                    TransferFrame::Chunk {
                        offset,
                        hash: hash.clone(),
                        data: data.clone(),
                    }
                };
                let mut bytes = chunk_frame_head(zstd, offset, &hash, data.len());
                bytes.extend_from_slice(&data);
                assert_eq!(bytes, crate::codec::encode_frame(&frame).unwrap());
                let view: ChunkFrameRef = crate::codec::decode_borrowed(&bytes[4..]).unwrap();
                let expected = if zstd {
                    ChunkFrameRef::ZstdChunk {
                        offset,
                        hash: &hash,
                        data: &data,
                    }
                } else {
                    ChunkFrameRef::Chunk {
                        offset,
                        hash: &hash,
                        data: &data,
                    }
                };
                assert_eq!(view, expected);
            }
        }
        let finish = encode_payload(&TransferFrame::Finish { digest: vec![5] }).unwrap();
        assert!(crate::codec::decode_borrowed::<ChunkFrameRef>(&finish).is_err());
        assert!(TransferTicket::valid_id(&"0f".repeat(16)));
        assert!(!TransferTicket::valid_id("../../etc"));
    }
}
