//! Desktop notifications of service status changes, through the freedesktop notification
//! service (`org.freedesktop.Notifications`) on the session bus. The engine hands each change
//! to a task of its own and never waits for the desktop; where there is no session bus, the
//! log says so once and status changes stay events.

use std::collections::BTreeMap;

use tokio::sync::mpsc;

/// Notices wait here for the desktop; when it is full, a notice is dropped (it is an event
/// already) and counted in the log.
pub const NOTICE_QUEUE: usize = 64;

const DEST: &str = "org.freedesktop.Notifications";
const PATH: &str = "/org/freedesktop/Notifications";

/// Where notifications go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DesktopNotifications {
    /// None: the headless console and tests.
    #[default]
    Off,
    /// The desktop session's bus (`DBUS_SESSION_BUS_ADDRESS`, else `$XDG_RUNTIME_DIR/bus`).
    SessionBus,
    /// A bus at this D-Bus address.
    Address(String),
}

/// How bad a change is, as the notification's urgency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Low,
    Normal,
    Critical,
}

/// One service status change.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub service: String,
    pub summary: String,
    pub body: String,
    pub urgency: Urgency,
}

/// Starts the notifier; `None` when notifications are off.
pub fn start(setting: &DesktopNotifications) -> Option<mpsc::Sender<Notice>> {
    if *setting == DesktopNotifications::Off {
        return None;
    }
    let (tx, rx) = mpsc::channel(NOTICE_QUEUE);
    tokio::spawn(run(setting.clone(), rx));
    Some(tx)
}

async fn connect(setting: &DesktopNotifications) -> Result<zbus::Connection, String> {
    match setting {
        DesktopNotifications::Off => Err("desktop notifications are off".into()),
        DesktopNotifications::SessionBus => {
            let has_bus = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some()
                || std::env::var_os("XDG_RUNTIME_DIR")
                    .is_some_and(|d| std::path::Path::new(&d).join("bus").exists());
            if !has_bus {
                return Err("there is no session bus (DBUS_SESSION_BUS_ADDRESS is not set)".into());
            }
            zbus::Connection::session().await.map_err(|e| e.to_string())
        }
        DesktopNotifications::Address(address) => {
            zbus::connection::Builder::address(address.as_str())
                .map_err(|e| e.to_string())?
                .build()
                .await
                .map_err(|e| e.to_string())
        }
    }
}

async fn run(setting: DesktopNotifications, mut rx: mpsc::Receiver<Notice>) {
    let connection = match connect(&setting).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!("no desktop notifications: {e}; service status changes are events");
            // Drain, so that the engine's sends keep succeeding cheaply.
            while rx.recv().await.is_some() {}
            return;
        }
    };
    // A service's later notice replaces its earlier one on the desktop.
    let mut shown: BTreeMap<String, u32> = BTreeMap::new();
    let mut failing = false;
    while let Some(notice) = rx.recv().await {
        let replaces = shown.get(&notice.service).copied().unwrap_or(0);
        let urgency: u8 = match notice.urgency {
            Urgency::Low => 0,
            Urgency::Normal => 1,
            Urgency::Critical => 2,
        };
        let mut hints: std::collections::HashMap<&str, zbus::zvariant::Value<'_>> =
            std::collections::HashMap::new();
        hints.insert("urgency", zbus::zvariant::Value::U8(urgency));
        hints.insert("category", zbus::zvariant::Value::from("dunes.service"));
        let actions: Vec<&str> = Vec::new();
        let sent = connection
            .call_method(
                Some(DEST),
                PATH,
                Some(DEST),
                "Notify",
                &(
                    "Dunes",
                    replaces,
                    "",
                    notice.summary.as_str(),
                    notice.body.as_str(),
                    actions,
                    hints,
                    -1i32,
                ),
            )
            .await;
        match sent.and_then(|reply| reply.body().deserialize::<u32>()) {
            Ok(id) => {
                shown.insert(notice.service, id);
                if failing {
                    tracing::info!("desktop notifications work again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("a desktop notification failed: {e}");
                    failing = true;
                }
            }
        }
    }
}
