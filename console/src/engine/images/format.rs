//! What an image file is, from its first bytes: a qcow2 disk, an ISO 9660 volume (an
//! installer), or a raw disk with a partition table. A qcow2 that names a backing file or
//! keeps its data in an external file is refused: either would make a host read a file
//! outside the image.

/// How many bytes of a file [`detect`] looks at: the qcow2 header and its backing file
/// name, and the first volume descriptor of an ISO 9660 volume (sector 16).
pub const HEAD_BYTES: usize = 64 * 1024;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Byte of the first volume descriptor's identifier ("CD001") in an ISO 9660 volume.
const ISO_ID_AT: usize = 16 * 2048 + 1;
/// qcow2 version 3 incompatible feature: the guest's data is in an external file.
const QCOW2_EXTERNAL_DATA: u64 = 1 << 2;

pub use dunes_shared::model::ImageFormat;

/// A file recognised as an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected {
    pub format: ImageFormat,
    /// What a guest sees: the disk's size, or the volume's.
    pub virtual_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a disk image: no qcow2 header, no ISO 9660 volume and no partition table")]
    NotAnImage,
    #[error("the qcow2 header is cut short")]
    Truncated,
    #[error("qcow2 version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error(
        "the qcow2 image builds on the backing file {0:?}: make it one file first (qemu-img convert -O qcow2 IN OUT)"
    )]
    BackingFile(String),
    #[error(
        "the qcow2 image keeps its data in an external file: make it one file first (qemu-img convert -O qcow2 IN OUT)"
    )]
    ExternalData,
    #[error("the qcow2 image is {0} bytes large for the guest; images stop at 64 TiB")]
    TooLarge(u64),
}

/// The largest disk an image may give a guest.
pub const MAX_VIRTUAL_BYTES: u64 = 64 << 40;

fn be_u32(head: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(head.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(head: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(head.get(at..at + 8)?.try_into().ok()?))
}

/// What the file whose first bytes are `head` (up to [`HEAD_BYTES`]) and whose length is
/// `file_bytes` is.
pub fn detect(head: &[u8], file_bytes: u64) -> Result<Detected, FormatError> {
    if head.starts_with(QCOW2_MAGIC) {
        return qcow2(head);
    }
    if head.get(ISO_ID_AT..ISO_ID_AT + 5) == Some(b"CD001") {
        return Ok(Detected {
            format: ImageFormat::Iso,
            virtual_bytes: file_bytes,
        });
    }
    let mbr = head.get(510..512) == Some(&[0x55, 0xaa]);
    let gpt = head.get(512..520) == Some(b"EFI PART");
    if (mbr || gpt) && file_bytes.is_multiple_of(512) {
        return Ok(Detected {
            format: ImageFormat::Raw,
            virtual_bytes: file_bytes,
        });
    }
    Err(FormatError::NotAnImage)
}

fn qcow2(head: &[u8]) -> Result<Detected, FormatError> {
    let version = be_u32(head, 4).ok_or(FormatError::Truncated)?;
    if !(2..=3).contains(&version) {
        return Err(FormatError::Version(version));
    }
    let backing_at = be_u64(head, 8).ok_or(FormatError::Truncated)?;
    let backing_len = be_u32(head, 16).ok_or(FormatError::Truncated)?;
    let virtual_bytes = be_u64(head, 24).ok_or(FormatError::Truncated)?;
    if backing_at != 0 {
        let name = usize::try_from(backing_at)
            .ok()
            .and_then(|at| head.get(at..at.checked_add(backing_len as usize)?))
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "(past the header)".into());
        return Err(FormatError::BackingFile(name));
    }
    if version == 3 {
        let incompatible = be_u64(head, 72).ok_or(FormatError::Truncated)?;
        if incompatible & QCOW2_EXTERNAL_DATA != 0 {
            return Err(FormatError::ExternalData);
        }
    }
    if virtual_bytes > MAX_VIRTUAL_BYTES {
        return Err(FormatError::TooLarge(virtual_bytes));
    }
    Ok(Detected {
        format: ImageFormat::Qcow2,
        virtual_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A qcow2 header of `version` for a disk of `size` bytes.
    fn qcow2_head(version: u32, size: u64) -> Vec<u8> {
        let mut head = vec![0u8; 512];
        head[..4].copy_from_slice(QCOW2_MAGIC);
        head[4..8].copy_from_slice(&version.to_be_bytes());
        head[24..32].copy_from_slice(&size.to_be_bytes());
        head
    }

    #[test]
    fn a_plain_qcow2_is_taken_with_its_guest_size() {
        for version in [2, 3] {
            assert_eq!(
                detect(&qcow2_head(version, 10 << 30), 200_000),
                Ok(Detected {
                    format: ImageFormat::Qcow2,
                    virtual_bytes: 10 << 30
                })
            );
        }
    }

    #[test]
    fn a_qcow2_that_reads_another_file_is_refused() {
        let mut head = qcow2_head(3, 1 << 30);
        let name = b"/etc/shadow";
        head[8..16].copy_from_slice(&(400u64).to_be_bytes());
        head[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        head[400..400 + name.len()].copy_from_slice(name);
        assert_eq!(
            detect(&head, 512),
            Err(FormatError::BackingFile("/etc/shadow".into()))
        );
        let mut head = qcow2_head(3, 1 << 30);
        head[72..80].copy_from_slice(&QCOW2_EXTERNAL_DATA.to_be_bytes());
        assert_eq!(detect(&head, 512), Err(FormatError::ExternalData));
    }

    #[test]
    fn a_broken_qcow2_header_is_refused() {
        assert_eq!(
            detect(&qcow2_head(3, 1)[..20], 20),
            Err(FormatError::Truncated)
        );
        assert_eq!(detect(&qcow2_head(7, 1), 512), Err(FormatError::Version(7)));
        assert_eq!(
            detect(&qcow2_head(3, u64::MAX), 512),
            Err(FormatError::TooLarge(u64::MAX))
        );
    }

    #[test]
    fn an_iso_and_a_partitioned_raw_disk_are_recognised() {
        let mut iso = vec![0u8; HEAD_BYTES];
        iso[ISO_ID_AT..ISO_ID_AT + 5].copy_from_slice(b"CD001");
        assert_eq!(detect(&iso, 3 << 20).unwrap().format, ImageFormat::Iso);
        let mut mbr = vec![0u8; 4096];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(
            detect(&mbr, 8 << 20),
            Ok(Detected {
                format: ImageFormat::Raw,
                virtual_bytes: 8 << 20
            })
        );
        let mut gpt = vec![0u8; 4096];
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(detect(&gpt, 8 << 20).unwrap().format, ImageFormat::Raw);
    }

    #[test]
    fn anything_else_is_not_an_image() {
        assert_eq!(detect(b"hello, world\n", 13), Err(FormatError::NotAnImage));
        assert_eq!(detect(&[], 0), Err(FormatError::NotAnImage));
        // A partition table on a file whose length is no whole number of sectors.
        let mut mbr = vec![0u8; 4096];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(detect(&mbr, 4097), Err(FormatError::NotAnImage));
    }
}
