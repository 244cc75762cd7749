//! The image library: operating system disks and installers the console keeps, each by name,
//! with its format, its size and its BLAKE3 digest. `format` tells what a file is (pure);
//! `library` copies an imported file into the console's images directory (blocking I/O, no
//! engine state); the driver records it once its copy is whole.

mod driver;
pub mod format;
pub mod library;
pub(in crate::engine) mod state;

pub use format::ImageFormat;
pub use state::ImageRecord;
