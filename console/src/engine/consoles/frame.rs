//! A VM's screen as the engine keeps it: the RGBA pixels the RFB client's updates draw,
//! checked against the screen's bounds (a display's rectangles come from the network), and
//! its PNG form for screenshots.

use std::sync::Arc;

use thiserror::Error;
use vnc::{Rect, VncEvent};

/// The largest screen taken: 8K on each side. A display asking for more is refused.
pub const MAX_SIDE: u32 = 8192;
/// The longest PNG of a screen a viewer takes from a stream (an 8K screen of noise, stored,
/// stays below it).
pub const MAX_PICTURE_BYTES: u32 = 256 * 1024 * 1024;

/// One picture of a screen, shared by every viewer until the next update.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScreenFrame {
    pub width: u32,
    pub height: u32,
    /// `width * height` pixels, four bytes each (red, green, blue, alpha), rows top down.
    pub rgba: Vec<u8>,
    /// Counts updates since the session opened: a viewer redraws when it moves.
    pub generation: u64,
}

impl ScreenFrame {
    /// Whether anything but one colour is on the screen.
    pub fn has_content(&self) -> bool {
        let mut pixels = self.rgba.chunks_exact(4);
        match pixels.next() {
            Some(first) => pixels.any(|p| p != first),
            None => false,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum FrameError {
    #[error("the display asked for a {width}×{height} screen, larger than {MAX_SIDE} a side")]
    TooLarge { width: u32, height: u32 },
    #[error("the display sent a rectangle outside its screen")]
    OutOfBounds,
    #[error("the display sent {got} bytes for a rectangle of {want}")]
    ShortImage { got: usize, want: usize },
    #[error("encoding the PNG: {0}")]
    Png(String),
}

/// The pixels an RFB session has drawn so far.
#[derive(Debug, Default)]
pub struct Framebuffer {
    frame: ScreenFrame,
}

impl Framebuffer {
    /// Applies one event of the RFB client; `Ok(true)` when the pixels changed.
    pub fn apply(&mut self, event: &VncEvent) -> Result<bool, FrameError> {
        match event {
            VncEvent::SetResolution(screen) => {
                self.resize(u32::from(screen.width), u32::from(screen.height))?;
                Ok(true)
            }
            VncEvent::RawImage(rect, data) => {
                self.draw(rect, data)?;
                Ok(true)
            }
            VncEvent::Copy(dst, src) => {
                self.copy(dst, src)?;
                Ok(true)
            }
            // The pixel format is fixed when connecting; the cursor is drawn by the guest
            // (the client does not ask for it separately); bells and text change nothing.
            _ => Ok(false),
        }
    }

    /// A picture of the screen now, for viewers.
    pub fn snapshot(&mut self) -> Arc<ScreenFrame> {
        self.frame.generation += 1;
        Arc::new(self.frame.clone())
    }

    fn resize(&mut self, width: u32, height: u32) -> Result<(), FrameError> {
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(FrameError::TooLarge { width, height });
        }
        self.frame.width = width;
        self.frame.height = height;
        // A new mode starts black (opaque), as a monitor does.
        self.frame.rgba = [0, 0, 0, 255].repeat(width as usize * height as usize);
        Ok(())
    }

    /// Byte offset of the pixel at (x, y), and the rectangle's row length in bytes, if the
    /// rectangle lies inside the screen.
    fn bounds(&self, rect: &Rect) -> Result<(usize, usize), FrameError> {
        let right = u32::from(rect.x) + u32::from(rect.width);
        let bottom = u32::from(rect.y) + u32::from(rect.height);
        if right > self.frame.width || bottom > self.frame.height {
            return Err(FrameError::OutOfBounds);
        }
        let start = (rect.y as usize * self.frame.width as usize + rect.x as usize) * 4;
        Ok((start, rect.width as usize * 4))
    }

    fn draw(&mut self, rect: &Rect, data: &[u8]) -> Result<(), FrameError> {
        let (start, row_bytes) = self.bounds(rect)?;
        let want = row_bytes * rect.height as usize;
        if data.len() < want {
            return Err(FrameError::ShortImage {
                got: data.len(),
                want,
            });
        }
        let stride = self.frame.width as usize * 4;
        for (row, source) in data[..want].chunks_exact(row_bytes.max(1)).enumerate() {
            let at = start + row * stride;
            let target = &mut self.frame.rgba[at..at + row_bytes];
            target.copy_from_slice(source);
            // The fourth byte of a pixel is padding on the wire: make it opaque.
            for alpha in target.iter_mut().skip(3).step_by(4) {
                *alpha = 255;
            }
        }
        Ok(())
    }

    fn copy(&mut self, dst: &Rect, src: &Rect) -> Result<(), FrameError> {
        let (from, row_bytes) = self.bounds(&Rect {
            width: dst.width,
            height: dst.height,
            ..*src
        })?;
        let (to, _) = self.bounds(dst)?;
        let stride = self.frame.width as usize * 4;
        // Through a copy of the source: the two rectangles may overlap.
        let mut rows = Vec::with_capacity(row_bytes * dst.height as usize);
        for row in 0..dst.height as usize {
            let at = from + row * stride;
            rows.extend_from_slice(&self.frame.rgba[at..at + row_bytes]);
        }
        for (row, source) in rows.chunks_exact(row_bytes.max(1)).enumerate() {
            let at = to + row * stride;
            self.frame.rgba[at..at + row_bytes].copy_from_slice(source);
        }
        Ok(())
    }
}

/// The frame as a PNG file's bytes (RGB, 8 bits a channel).
pub fn encode_png(frame: &ScreenFrame) -> Result<Vec<u8>, FrameError> {
    let png_err = |e: png::EncodingError| FrameError::Png(e.to_string());
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, frame.width, frame.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_err)?;
    let rgb: Vec<u8> = frame
        .rgba
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    writer.write_image_data(&rgb).map_err(png_err)?;
    writer.finish().map_err(png_err)?;
    Ok(out)
}

/// A frame from a PNG that [`encode_png`] wrote (RGB or RGBA, 8 bits a channel, at most
/// [`MAX_SIDE`] a side), as update `generation` of a screen.
pub fn decode_png(bytes: &[u8], generation: u64) -> Result<ScreenFrame, FrameError> {
    let png_err = |e: png::DecodingError| FrameError::Png(e.to_string());
    let side = MAX_SIDE as usize;
    let limits = png::Limits {
        bytes: side * side * 4,
    };
    let decoder = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits);
    let mut reader = decoder.read_info().map_err(png_err)?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(FrameError::TooLarge { width, height });
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| FrameError::Png("the picture is too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(png_err)?;
    buf.truncate(info.line_size * info.height as usize);
    let rgba = match (info.color_type, info.bit_depth) {
        (png::ColorType::Rgb, png::BitDepth::Eight) => buf
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        (png::ColorType::Rgba, png::BitDepth::Eight) => buf,
        (color, depth) => {
            return Err(FrameError::Png(format!(
                "a {color:?} picture of {depth:?} bits is not a screen's"
            )));
        }
    };
    if rgba.len() != width as usize * height as usize * 4 {
        return Err(FrameError::ShortImage {
            got: rgba.len(),
            want: width as usize * height as usize * 4,
        });
    }
    Ok(ScreenFrame {
        width,
        height,
        rgba,
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(x: u16, y: u16, width: u16, height: u16) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    fn pixel(frame: &ScreenFrame, x: usize, y: usize) -> [u8; 4] {
        let at = (y * frame.width as usize + x) * 4;
        frame.rgba[at..at + 4].try_into().unwrap()
    }

    #[test]
    fn updates_draw_where_they_say_and_copies_may_overlap() {
        let mut fb = Framebuffer::default();
        fb.apply(&VncEvent::SetResolution((4, 3).into())).unwrap();
        assert!(!fb.snapshot().has_content());
        // A red 2×1 rectangle at (1, 1), its padding bytes zero as servers send them.
        let red = [200, 0, 0, 0, 200, 0, 0, 0].to_vec();
        assert!(
            fb.apply(&VncEvent::RawImage(rect(1, 1, 2, 1), red))
                .unwrap()
        );
        let frame = fb.snapshot();
        assert!(frame.has_content());
        assert_eq!(pixel(&frame, 1, 1), [200, 0, 0, 255]);
        assert_eq!(pixel(&frame, 2, 1), [200, 0, 0, 255]);
        assert_eq!(pixel(&frame, 0, 1), [0, 0, 0, 255]);
        // Copied one pixel right, over itself.
        fb.apply(&VncEvent::Copy(rect(2, 1, 2, 1), rect(1, 1, 2, 1)))
            .unwrap();
        let frame = fb.snapshot();
        assert_eq!(pixel(&frame, 3, 1), [200, 0, 0, 255]);
        assert_eq!(pixel(&frame, 1, 1), [200, 0, 0, 255]);
        assert!(frame.generation > 1);
    }

    #[test]
    fn a_display_cannot_write_outside_its_screen() {
        let mut fb = Framebuffer::default();
        fb.apply(&VncEvent::SetResolution((4, 3).into())).unwrap();
        let before = fb.snapshot();
        assert_eq!(
            fb.apply(&VncEvent::RawImage(rect(3, 0, 2, 1), vec![1; 8])),
            Err(FrameError::OutOfBounds)
        );
        assert_eq!(
            fb.apply(&VncEvent::RawImage(rect(0, 0, 2, 1), vec![1; 7])),
            Err(FrameError::ShortImage { got: 7, want: 8 })
        );
        assert_eq!(
            fb.apply(&VncEvent::Copy(rect(0, 0, 2, 2), rect(3, 2, 2, 2))),
            Err(FrameError::OutOfBounds)
        );
        assert!(matches!(
            fb.apply(&VncEvent::SetResolution((9000, 10).into())),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(fb.snapshot().rgba, before.rgba);
    }

    #[test]
    fn a_picture_sent_as_a_png_reads_back_as_it_was() {
        let mut rgba = Vec::new();
        for i in 0..(7 * 5) {
            rgba.extend_from_slice(&[i as u8, 255 - i as u8, 7, 255]);
        }
        let frame = ScreenFrame {
            width: 7,
            height: 5,
            rgba,
            generation: 3,
        };
        let back = decode_png(&encode_png(&frame).unwrap(), 9).unwrap();
        assert_eq!((back.width, back.height, back.generation), (7, 5, 9));
        assert_eq!(back.rgba, frame.rgba);
        assert!(decode_png(b"not a png", 1).is_err());
    }

    #[test]
    fn a_screenshot_is_a_png_of_the_screen() {
        let mut fb = Framebuffer::default();
        fb.apply(&VncEvent::SetResolution((3, 2).into())).unwrap();
        fb.apply(&VncEvent::RawImage(rect(0, 0, 1, 1), vec![10, 20, 30, 0]))
            .unwrap();
        let bytes = encode_png(&fb.snapshot()).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..6], &[10, 20, 30, 0, 0, 0]);
    }
}
