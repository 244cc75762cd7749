//! Serial consoles and screens of the fleet's VMs: one stream to the VM's agent per console
//! or screen, shared by everyone who watches it. `state` holds the open consoles and what a
//! viewer gets; the driver opens them and relays their bytes; `screen` speaks RFB to a VM's
//! display and keeps its pixels (`frame`, pure).

pub(in crate::engine) mod driver;
pub mod frame;
pub(in crate::engine) mod screen;
pub(in crate::engine) mod state;

pub use frame::ScreenFrame;
pub use screen::{ScreenAttach, ScreenInput, ScreenKeys};
pub use state::{ConsoleAttach, Keyboard};
