//! Serial consoles of the fleet's VMs: one stream to the VM's agent per console, shared by
//! everyone who watches it; one of them types. `state` holds the open consoles and what a
//! viewer gets; the driver opens them and relays their bytes.

pub(in crate::engine) mod driver;
pub(in crate::engine) mod state;

pub use state::{ConsoleAttach, Keyboard};
