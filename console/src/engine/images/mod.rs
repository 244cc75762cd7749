//! The image library: operating system disks and installers the console keeps, each by name,
//! with its format, its size and its BLAKE3 digest. `format` tells what a file is (pure);
//! `library` copies an imported file into the console's images directory (blocking I/O, no
//! engine state); the driver records it once its copy is whole. `push` streams the copy to a
//! host's agent, which keeps it as a template of the image's name.

mod driver;
pub mod format;
pub mod library;
pub mod push;
pub(in crate::engine) mod state;

pub use format::ImageFormat;
pub use state::{CreateFromImage, ImagePushReport, ImageRecord, ImageTransferProgress};
