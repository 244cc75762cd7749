//! Framing: a little-endian `u32` length, then a MessagePack payload, never over a limit.
//!
//! Payloads are self-describing: structs travel as maps keyed by field name and enum variants
//! by name, so a field a newer peer appends is skipped by an older one, a field an older peer
//! does not send takes its `#[serde(default)]`, and a variant an older peer does not know is
//! told apart from garbage (see [`decode_message`]). The rules are in `docs/PROTOCOL.md`.

use bytes::BufMut as _;
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// No control message comes near this; anything larger is an error or an attack.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Frames before the peer is authenticated (enrollment, probes, the hello) stay small.
pub const PREAUTH_FRAME_BYTES: usize = 64 * 1024;
/// A length prefix alone makes the reader allocate at most this much (a disk chunk and its
/// header fit); beyond it the payload buffer grows only as bytes arrive.
const UPFRONT_BYTES: usize = 1152 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("frame does not decode")]
    Undecodable(#[source] rmp_serde::decode::Error),
    #[error("message does not encode")]
    Unencodable(#[source] rmp_serde::encode::Error),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream failed")]
    Io(#[from] std::io::Error),
}

/// A message as decoded: one this release knows, or a variant a newer peer added.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<T> {
    Known(T),
    /// The variant's name, for a warning and a count; the frame is skipped.
    Unknown(String),
}

/// The payload bytes of one message, without a length prefix.
pub fn encode_payload<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    rmp_serde::to_vec_named(message).map_err(FrameError::Unencodable)
}

/// Encodes one message with its length prefix.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    let mut serializer = rmp_serde::Serializer::new(&mut out).with_struct_map();
    message
        .serialize(&mut serializer)
        .map_err(FrameError::Unencodable)?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME_BYTES,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Decodes a payload (without its length prefix).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(payload).map_err(FrameError::Undecodable)
}

/// Decodes a payload into a type that borrows from it (its byte strings are not copied).
pub fn decode_borrowed<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(payload).map_err(FrameError::Undecodable)
}

/// Decodes a payload that holds an enum, telling a variant this release does not know (sent
/// by a newer peer) from a payload that is broken.
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<Decoded<T>, FrameError> {
    match rmp_serde::from_slice(payload) {
        Ok(value) => Ok(Decoded::Known(value)),
        Err(err) => match variant_name(payload) {
            Some(name) if !enum_variants::<T>().contains(&name.as_str()) => {
                Ok(Decoded::Unknown(name))
            }
            _ => Err(FrameError::Undecodable(err)),
        },
    }
}

/// Longest variant name taken as a name; anything longer is garbage.
const VARIANT_NAME_MAX: usize = 64;

/// The variant name an externally tagged enum was encoded with: a string for a unit variant,
/// or the key of a one-entry map.
fn variant_name(payload: &[u8]) -> Option<String> {
    let mut rd = payload;
    let marker = *rd.first()?;
    let is_map = matches!(marker, 0x80..=0x8f | 0xde | 0xdf);
    if is_map && rmp::decode::read_map_len(&mut rd).ok()? != 1 {
        return None;
    }
    let len = rmp::decode::read_str_len(&mut rd).ok()? as usize;
    if len > VARIANT_NAME_MAX {
        return None;
    }
    let bytes = rd.get(..len)?;
    String::from_utf8(bytes.to_vec())
        .ok()
        .filter(|n| n.bytes().all(|b| b.is_ascii_graphic()))
}

/// The variant names of a derived enum, read from what its `Deserialize` asks for.
pub fn enum_variants<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut capture = VariantCapture(None);
    let _ = T::deserialize(&mut capture);
    capture.0.unwrap_or(&[])
}

struct VariantCapture(Option<&'static [&'static str]>);

#[derive(Debug)]
struct Captured;

impl std::fmt::Display for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("captured")
    }
}
impl std::error::Error for Captured {}
impl serde::de::Error for Captured {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Captured
    }
}

impl<'de> serde::Deserializer<'de> for &mut VariantCapture {
    type Error = Captured;

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Captured> {
        self.0 = Some(variants);
        Err(Captured)
    }

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
        Err(Captured)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

pub async fn write_frame<W, T>(writer: &mut W, message: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(message)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame's payload, at most `limit` bytes; `Ok(None)` when the stream ends cleanly
/// before a frame starts. The buffer grows with the bytes that arrive.
pub async fn read_payload<R>(reader: &mut R, limit: usize) -> Result<Option<Vec<u8>>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut len_bytes = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = reader.read(&mut len_bytes[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    // Filled in place, never zeroed first: bulk frames are read at link speed.
    let mut payload = Vec::with_capacity(len.min(UPFRONT_BYTES));
    while payload.len() < len {
        if payload.len() == payload.capacity() {
            let more = payload.len().min(len - payload.len());
            payload.reserve_exact(more);
        }
        let room = (payload.capacity() - payload.len()).min(len - payload.len());
        let n = reader.read_buf(&mut (&mut payload).limit(room)).await?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
    }
    Ok(Some(payload))
}

/// Reads one frame of at most `limit` bytes; `Ok(None)` when the stream ends cleanly first.
pub async fn read_frame_limited<R, T>(reader: &mut R, limit: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_payload(reader, limit).await? {
        Some(payload) => decode_payload(&payload).map(Some),
        None => Ok(None),
    }
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly before a frame starts.
pub async fn read_frame_opt<R, T>(reader: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_limited(reader, MAX_FRAME_BYTES).await
}

/// Reads one frame; a stream that ends first is an error.
pub async fn read_frame<R, T>(reader: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_opt(reader).await?.ok_or(FrameError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AgentEvent, ListVms, Request};

    #[tokio::test]
    async fn round_trip() {
        let frame = encode_frame(&Request::ListVms(ListVms)).unwrap();
        let mut reader = &frame[..];
        let back: Request = read_frame(&mut reader).await.unwrap();
        assert_eq!(back, Request::ListVms(ListVms));
        let end: Option<Request> = read_frame_opt(&mut reader).await.unwrap();
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_it() {
        let mut bytes = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = read_frame::<_, Request>(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == MAX_FRAME_BYTES + 1));
        let huge = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            encode_frame(&huge),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn preauth_limit_refuses_what_the_full_limit_takes() {
        let big = Request::EnrollBegin(crate::protocol::EnrollBegin {
            token: "t".into(),
            ca_cert_der: vec![7; PREAUTH_FRAME_BYTES],
        });
        let frame = encode_frame(&big).unwrap();
        let err = read_frame_limited::<_, Request>(&mut &frame[..], PREAUTH_FRAME_BYTES)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { limit, .. } if limit == PREAUTH_FRAME_BYTES),
            "{err}"
        );
        let back: Request = read_frame(&mut &frame[..]).await.unwrap();
        assert_eq!(back, big);
    }

    /// A reader that notes the largest buffer it was handed.
    struct Watching {
        data: Vec<u8>,
        at: usize,
        largest_buffer: usize,
    }

    impl AsyncRead for Watching {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.largest_buffer = self.largest_buffer.max(buf.remaining());
            let n = buf.remaining().min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_length_prefix_alone_allocates_at_most_a_chunk() {
        // A peer that announces 4 MiB and sends 100 KiB gets a truncation error, and the
        // buffer never grew past what a disk chunk needs.
        let mut data = (MAX_FRAME_BYTES as u32).to_le_bytes().to_vec();
        data.extend_from_slice(&[0x90; 100 * 1024]);
        let mut reader = Watching {
            data,
            at: 0,
            largest_buffer: 0,
        };
        let err = read_payload(&mut reader, MAX_FRAME_BYTES)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        assert!(
            reader.largest_buffer <= UPFRONT_BYTES,
            "a {} byte buffer for a frame not yet sent",
            reader.largest_buffer
        );
    }

    #[tokio::test]
    async fn a_frame_larger_than_a_chunk_reads_whole_through_a_slow_reader() {
        let big = Request::EnrollBegin(crate::protocol::EnrollBegin {
            token: "t".into(),
            ca_cert_der: (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect(),
        });
        let frame = encode_frame(&big).unwrap();
        // Bytes arrive a few at a time, as from a network.
        let (mut tx, mut rx) = tokio::io::duplex(1000);
        let writer = tokio::spawn(async move { tx.write_all(&frame).await });
        let back: Request = read_frame(&mut rx).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(back, big);
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        // Every short garbage input must give an error (or a valid message), never a panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..4000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let mut bytes = (len as u32).to_le_bytes().to_vec();
            bytes.extend((0..len).map(|i| (seed >> (i % 56)) as u8 ^ round as u8));
            let _ = read_frame::<_, Request>(&mut &bytes[..]).await;
            let _ = decode_message::<AgentEvent>(&bytes[4..]);
        }
        let err = read_frame::<_, Request>(&mut &[3u8, 0, 0, 0, 0xc1, 0xc1, 0xc1][..])
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
        let err = read_frame::<_, Request>(&mut &[9u8, 0, 0, 0, 1][..])
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        let err = read_frame::<_, Request>(&mut &[1u8, 0][..])
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }

    #[test]
    fn variants_are_read_from_the_derive() {
        let events = enum_variants::<AgentEvent>();
        assert!(events.contains(&"HostStatus") && events.contains(&"VmList"));
        assert!(enum_variants::<Request>().contains(&"Hello"));
    }

    #[test]
    fn an_unknown_variant_is_told_from_garbage() {
        // {"VmMigrated": {"name": "a"}} from a newer agent.
        let mut future = vec![0x81];
        rmp::encode::write_str(&mut future, "VmMigrated").unwrap();
        future.push(0x81);
        rmp::encode::write_str(&mut future, "name").unwrap();
        rmp::encode::write_str(&mut future, "a").unwrap();
        assert_eq!(
            decode_message::<AgentEvent>(&future).unwrap(),
            Decoded::Unknown("VmMigrated".into())
        );
        // A known variant with a broken body is an error, not an unknown variant.
        let mut broken = vec![0x81];
        rmp::encode::write_str(&mut broken, "VmRemoved").unwrap();
        broken.push(0x07);
        assert!(decode_message::<AgentEvent>(&broken).is_err());
        assert!(decode_message::<AgentEvent>(&[0xc1]).is_err());
    }
}
