//! The `cidata` seed of cloud-init's NoCloud source: an ISO 9660 volume labelled CIDATA
//! holding `meta-data`, `user-data` and, when given, `network-config`. Joliet and Rock Ridge
//! carry the lower-case names that cloud-init looks for; made in memory, with no tool.

use std::{io::Cursor, sync::Arc};

use hadris_iso::{
    joliet::JolietLevel,
    read::PathSeparator,
    rrip::RripOptions,
    write::{
        File as IsoFile, InputFiles, IsoImageWriter,
        estimator::estimate,
        options::{BaseIsoLevel, CreationFeatures, IsoFormatOptions},
    },
};

/// Where the primary volume descriptor (sector 16) says how many sectors the volume has.
const PVD_SIZE_AT: usize = 16 * 2048 + 80;

/// What goes on a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("making the cloud-init seed failed: {0}")]
pub struct SeedError(String);

/// The seed as an ISO 9660 volume.
pub fn build_seed(seed: &Seed) -> Result<Vec<u8>, SeedError> {
    let mut files = vec![
        file("meta-data", &seed.meta_data),
        file("user-data", &seed.user_data),
    ];
    if let Some(network) = &seed.network_config {
        files.push(file("network-config", network));
    }
    let input = InputFiles {
        path_separator: PathSeparator::ForwardSlash,
        files,
    };
    let options = IsoFormatOptions {
        volume_name: "CIDATA".to_string(),
        system_id: None,
        volume_set_id: None,
        publisher_id: None,
        preparer_id: None,
        application_id: Some("DUNES".to_string()),
        sector_size: 2048,
        path_separator: PathSeparator::ForwardSlash,
        features: CreationFeatures {
            filenames: BaseIsoLevel::Level2 {
                supports_lowercase: false,
                supports_rrip: true,
            },
            long_filenames: false,
            joliet: Some(JolietLevel::Level3),
            rock_ridge: Some(RripOptions::default()),
            el_torito: None,
            hybrid_boot: None,
        },
        strict_charset: false,
    };
    // The writer fills a volume of its final size; a little more is cut off after.
    let bytes = estimate(&input, &options).minimum_bytes() + 64 * 2048;
    let bytes = usize::try_from(bytes).map_err(|_| SeedError("too large".into()))?;
    let mut volume = Cursor::new(vec![0u8; bytes]);
    IsoImageWriter::create(&mut volume, input, options).map_err(|e| SeedError(e.to_string()))?;
    let mut volume = volume.into_inner();
    // The primary volume descriptor's size in sectors (both-endian; its little-endian half).
    let sectors = volume
        .get(PVD_SIZE_AT..PVD_SIZE_AT + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")) as usize)
        .ok_or_else(|| SeedError("no primary volume descriptor".into()))?;
    if sectors == 0 || sectors * 2048 > volume.len() {
        return Err(SeedError(format!("a volume of {sectors} sectors")));
    }
    volume.truncate(sectors * 2048);
    Ok(volume)
}

fn file(name: &str, contents: &str) -> IsoFile {
    IsoFile::File {
        name: Arc::new(name.to_string()),
        contents: contents.as_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_is_a_cidata_volume_with_the_three_files() {
        let seed = Seed {
            meta_data: "instance-id: \"vm-1\"\nlocal-hostname: \"web-1\"\n".into(),
            user_data: "#cloud-config\npackages: [htop]\n".into(),
            network_config: Some("version: 2\nethernets: {}\n".into()),
        };
        let volume = build_seed(&seed).unwrap();
        assert_eq!(volume.len() % 2048, 0);
        // The primary volume descriptor, as blkid reads the label.
        assert_eq!(&volume[0x8001..0x8006], b"CD001");
        assert_eq!(&volume[0x8028..0x802e], b"CIDATA");
        // Read back by another program, through Joliet and through Rock Ridge: the names
        // cloud-init looks for, and their bytes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        std::fs::write(&path, &volume).unwrap();
        for names in ["-J", "-R"] {
            for (name, contents) in [
                ("meta-data", &seed.meta_data),
                ("user-data", &seed.user_data),
                ("network-config", seed.network_config.as_ref().unwrap()),
            ] {
                let out = std::process::Command::new("isoinfo")
                    .args([names, "-i"])
                    .arg(&path)
                    .args(["-x", &format!("/{name}")])
                    .output()
                    .expect(
                        "isoinfo (package genisoimage, which scripts/install-deps.sh installs)",
                    );
                assert!(out.status.success(), "{names} {name}");
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    **contents,
                    "{names} {name}"
                );
            }
        }
    }

    #[test]
    fn a_seed_without_network_config_has_two_files() {
        let seed = Seed {
            meta_data: "instance-id: \"a\"\n".into(),
            user_data: "#cloud-config\n".into(),
            network_config: None,
        };
        let volume = build_seed(&seed).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        std::fs::write(&path, &volume).unwrap();
        let out = std::process::Command::new("isoinfo")
            .args(["-J", "-f", "-i"])
            .arg(&path)
            .output()
            .expect("isoinfo");
        let listed = String::from_utf8_lossy(&out.stdout);
        let mut names: Vec<&str> = listed.lines().collect();
        names.sort();
        assert_eq!(names, ["/meta-data", "/user-data"]);
    }
}
