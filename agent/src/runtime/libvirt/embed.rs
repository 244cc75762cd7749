//! The embedded QEMU driver (`qemu:///embed`): its root lives inside the agent's data dir,
//! with a `qemu.conf` that lets it run as root without a system daemon's setup.

use super::super::RuntimeError;

/// What `qemu:///embed` needs in its root to run as root without a system daemon's setup.
const EMBED_QEMU_CONF: &str = "# Written by dunes-agent for the embedded QEMU driver.
user = \"root\"
group = \"root\"
security_driver = \"none\"
cgroup_controllers = [ ]
stdio_handler = \"file\"
dynamic_ownership = 0
remember_owner = 0
";

/// Resolves `.` and `..` without touching the file system, so a path can be checked before
/// anything is created there.
fn normalize_lexically(path: &std::path::Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The embed root travels inside a URI: characters with a meaning there would change it.
fn uri_safe(root: &std::path::Path) -> Result<(), RuntimeError> {
    let shown = root.display().to_string();
    if shown.chars().any(|c| {
        matches!(c, '?' | '&' | '#' | '%' | '\'' | '"') || c.is_whitespace() || c.is_control()
    }) {
        return Err(RuntimeError::Libvirt {
            action: "checking the embed root",
            message: format!(
                "{shown} has characters a libvirt URI cannot carry; use a plainer data dir path"
            ),
        });
    }
    Ok(())
}

/// Resolves the operator's libvirt URI against the data dir: `qemu:///embed` means an
/// embedded QEMU driver rooted at `DATA_DIR/qemu`, and an explicit embed root must lie
/// inside the data dir (the agent writes its configuration there).
pub fn resolve_uri(uri: &str, data_dir: &std::path::Path) -> Result<String, RuntimeError> {
    let root = match uri {
        "qemu:///embed" => None,
        _ => match uri.strip_prefix("qemu:///embed?root=") {
            Some(root) => Some(std::path::PathBuf::from(root)),
            None => return Ok(uri.to_string()),
        },
    };
    let resolving = |e: std::io::Error| RuntimeError::Libvirt {
        action: "resolving the data dir",
        message: e.to_string(),
    };
    // Both spellings of the data dir count: as given (perhaps through a symlink) and resolved.
    let given = normalize_lexically(&std::path::absolute(data_dir).map_err(resolving)?);
    let data_dir = data_dir.canonicalize().map_err(resolving)?;
    let absolute = match root {
        None => data_dir.join("qemu"),
        Some(root) if root.is_absolute() => normalize_lexically(&root),
        Some(root) => normalize_lexically(&data_dir.join(root)),
    };
    let inside = |path: &std::path::Path, lexical: bool| {
        if path.starts_with(&data_dir) || (lexical && path.starts_with(&given)) {
            Ok(())
        } else {
            Err(RuntimeError::Libvirt {
                action: "checking the embed root",
                message: format!(
                    "{} is outside the data dir {}",
                    path.display(),
                    data_dir.display()
                ),
            })
        }
    };
    // Checked before anything is created, and again below once symlinks are resolved.
    inside(&absolute, true)?;
    uri_safe(&absolute)?;
    std::fs::create_dir_all(absolute.join("etc")).map_err(|e| RuntimeError::Libvirt {
        action: "creating the embed root",
        message: format!("{}: {e}", absolute.display()),
    })?;
    let root = absolute.canonicalize().map_err(|e| RuntimeError::Libvirt {
        action: "resolving the embed root",
        message: e.to_string(),
    })?;
    inside(&root, false)?;
    uri_safe(&root)?;
    let conf = root.join("etc/qemu.conf");
    if !conf.exists() {
        std::fs::write(&conf, EMBED_QEMU_CONF).map_err(|e| RuntimeError::Libvirt {
            action: "writing qemu.conf",
            message: e.to_string(),
        })?;
    }
    Ok(format!("qemu:///embed?root={}", root.display()))
}

/// Starts libvirt's event loop once per process: the embedded QEMU driver and keep-alives
/// need it.
pub fn start_event_loop() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded QEMU driver and keep-alives need libvirt's event loop running.
        if virt::event::event_register_default_impl().is_ok() {
            let _ = std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| while virt::event::event_run_default_impl().is_ok() {});
        }
        virt::error::clear_error_callback();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_roots_stay_inside_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let uri = resolve_uri("qemu:///embed", &data).unwrap();
        let root = data.canonicalize().unwrap().join("qemu");
        assert_eq!(uri, format!("qemu:///embed?root={}", root.display()));
        assert!(
            std::fs::read_to_string(root.join("etc/qemu.conf"))
                .unwrap()
                .contains("security_driver = \"none\"")
        );
        assert!(
            resolve_uri("qemu:///embed?root=vm-root", &data)
                .unwrap()
                .ends_with("/data/vm-root")
        );
        let outside = dir.path().join("elsewhere");
        let err =
            resolve_uri(&format!("qemu:///embed?root={}", outside.display()), &data).unwrap_err();
        assert!(err.to_string().contains("outside the data dir"), "{err}");
        let err = resolve_uri("qemu:///embed?root=../escape", &data).unwrap_err();
        assert!(err.to_string().contains("outside the data dir"), "{err}");
        assert!(
            !outside.exists() && !dir.path().join("escape").exists(),
            "a refused root is never created"
        );
        assert_eq!(
            resolve_uri("test:///default", &data).unwrap(),
            "test:///default"
        );

        let odd = dir.path().join("with space");
        std::fs::create_dir_all(&odd).unwrap();
        let err = resolve_uri("qemu:///embed", &odd).unwrap_err();
        assert!(err.to_string().contains("cannot carry"), "{err}");
        assert!(
            !odd.join("qemu").exists(),
            "nothing is created for a refused root"
        );

        // A data dir reached through a symlink, with the default root or one named through
        // the link, is still the data dir.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        let uri = resolve_uri("qemu:///embed", &link).unwrap();
        assert_eq!(uri, format!("qemu:///embed?root={}", root.display()));
        let through_link = link.join("other-root");
        let uri = resolve_uri(
            &format!("qemu:///embed?root={}", through_link.display()),
            &link,
        )
        .unwrap();
        assert!(uri.ends_with("/data/other-root"), "{uri}");
    }
}
