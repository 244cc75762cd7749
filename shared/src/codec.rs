//! Framing: a little-endian `u32` length, then a postcard payload, never over a hard limit.

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// No control message comes near this; anything larger is an error or an attack.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("frame does not decode")]
    Undecodable(#[source] postcard::Error),
    #[error("message does not encode")]
    Unencodable(#[source] postcard::Error),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream failed")]
    Io(#[from] std::io::Error),
}

/// Encodes one message with its length prefix.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    let mut out =
        postcard::to_extend(message, std::mem::take(&mut out)).map_err(FrameError::Unencodable)?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Decodes a payload (without its length prefix); trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(payload).map_err(FrameError::Undecodable)?;
    if !rest.is_empty() {
        return Err(FrameError::Undecodable(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(value)
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

/// Reads one frame; `Ok(None)` when the stream ends cleanly before a frame starts.
pub async fn read_frame_opt<R, T>(reader: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
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
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    decode_payload(&payload).map(Some)
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
    use crate::protocol::{ListVms, Request};

    #[tokio::test]
    async fn round_trip() {
        let frame = encode_frame(&Request::ListVms(ListVms)).unwrap();
        assert_eq!(frame, [1, 0, 0, 0, 1]);
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
        assert!(matches!(err, FrameError::TooLarge { len } if len == MAX_FRAME_BYTES + 1));
        let huge = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            encode_frame(&huge),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        // Every short garbage input must give an error (or a valid request), never a panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let mut bytes = (len as u32).to_le_bytes().to_vec();
            bytes.extend((0..len).map(|i| (seed >> (i % 56)) as u8 ^ round as u8));
            let _ = read_frame::<_, Request>(&mut &bytes[..]).await;
        }
        let err = read_frame::<_, Request>(&mut &[3u8, 0, 0, 0, 0xff, 0xff, 0xff][..])
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
    fn trailing_bytes_are_refused() {
        assert!(decode_payload::<Request>(&[1, 0]).is_err());
    }
}
