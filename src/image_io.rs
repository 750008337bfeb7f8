//! Reading images and ground-truth masks from disk, with limits.
//!
//! Every image is decoded to 8-bit RGB (grayscale is replicated, alpha is
//! dropped, 16-bit is reduced, palettes are expanded). Dimensions are read
//! from the header before any pixel is decoded, so an oversized image or a
//! decompression bomb is refused without allocating it. Every error names the
//! file and the problem.

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, RgbImage};
use thiserror::Error;

/// Default largest image accepted, in pixels (a 64-megapixel frame).
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;
/// Default largest image file accepted, in bytes.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;
/// Mask pixels above this grey level are anomalous (masks are 0/255; JPEG-like
/// soft masks are thresholded at the middle).
pub const MASK_THRESHOLD: u8 = 127;

/// Bounds on what a decode may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecodeLimits {
    pub max_pixels: u64,
    pub max_file_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// An image or mask that cannot be used.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: empty file")]
    Empty { path: PathBuf },
    #[error("{path}: file of {bytes} bytes exceeds the limit of {limit} bytes")]
    FileTooLarge {
        path: PathBuf,
        bytes: u64,
        limit: u64,
    },
    #[error("{path}: not a readable image: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("{path}: image has zero width or height ({width}x{height})")]
    ZeroSize {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("{path}: {width}x{height} exceeds the limit of {limit} pixels")]
    TooManyPixels {
        path: PathBuf,
        width: u32,
        height: u32,
        limit: u64,
    },
    #[error("{path}: mask is {mask_w}x{mask_h} but its image is {image_w}x{image_h}")]
    MaskSize {
        path: PathBuf,
        mask_w: u32,
        mask_h: u32,
        image_w: u32,
        image_h: u32,
    },
}

impl ImageError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ImageError::Read { path, .. }
            | ImageError::Empty { path }
            | ImageError::FileTooLarge { path, .. }
            | ImageError::Decode { path, .. }
            | ImageError::ZeroSize { path, .. }
            | ImageError::TooManyPixels { path, .. }
            | ImageError::MaskSize { path, .. } => path,
        }
    }
}

/// Reads and decodes an image file to RGB.
pub fn load_rgb(path: &Path, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let bytes = read_limited(path, limits)?;
    decode_rgb(&bytes, path, limits)
}

/// Decodes image bytes to RGB; `path` only names the source in errors.
pub fn decode_rgb(
    bytes: &[u8],
    path: &Path,
    limits: &DecodeLimits,
) -> Result<RgbImage, ImageError> {
    let image = decode(bytes, path, limits)?;
    Ok(image.to_rgb8())
}

/// Reads a ground-truth mask and checks it has the image's size. Pixels above
/// [`MASK_THRESHOLD`] (in the mask's first channel) are anomalous.
pub fn load_mask(
    path: &Path,
    (image_w, image_h): (u32, u32),
    limits: &DecodeLimits,
) -> Result<Vec<bool>, ImageError> {
    let bytes = read_limited(path, limits)?;
    let gray = decode(&bytes, path, limits)?.to_luma8();
    let (mask_w, mask_h) = gray.dimensions();
    if (mask_w, mask_h) != (image_w, image_h) {
        let path = path.to_path_buf();
        return Err(ImageError::MaskSize {
            path,
            mask_w,
            mask_h,
            image_w,
            image_h,
        });
    }
    Ok(gray
        .into_raw()
        .into_iter()
        .map(|v| v > MASK_THRESHOLD)
        .collect())
}

/// Reads a file's bytes, refusing empty files and files over the size limit.
pub fn read_limited(path: &Path, limits: &DecodeLimits) -> Result<Vec<u8>, ImageError> {
    let read_err = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Opening a pipe blocks and a device never ends: only regular files are read.
    if !std::fs::metadata(path).map_err(read_err)?.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len == 0 {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }
    if len > limits.max_file_bytes {
        let (bytes, limit) = (len, limits.max_file_bytes);
        return Err(ImageError::FileTooLarge {
            path: path.to_path_buf(),
            bytes,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    BufReader::new(file)
        .take(limits.max_file_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(bytes)
}

fn decode(bytes: &[u8], path: &Path, limits: &DecodeLimits) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }
    let decode_err = |e: &dyn std::fmt::Display| ImageError::Decode {
        path: path.to_path_buf(),
        // Some decoders end their messages with a newline; errors are one line.
        message: e.to_string().trim().replace('\n', " "),
    };
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    let (width, height) = reader()
        .map_err(|e| decode_err(&e))?
        .into_dimensions()
        .map_err(|e| decode_err(&e))?;
    check_dimensions(path, width, height, limits)?;
    if bytes.starts_with(&JPEG_SOI) && !jpeg_is_complete(bytes) {
        let message = "JPEG data ends before its end-of-image marker (truncated file)".into();
        return Err(ImageError::Decode {
            path: path.to_path_buf(),
            message,
        });
    }

    let mut decoder = reader().map_err(|e| decode_err(&e))?;
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(width);
    decode_limits.max_image_height = Some(height);
    // Room for the decoded image at 16 bits per channel with alpha, plus slack.
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 24));
    decoder.limits(decode_limits);
    let image = decoder.decode().map_err(|e| decode_err(&e))?;
    check_dimensions(path, image.width(), image.height(), limits)?;
    Ok(image)
}

fn check_dimensions(
    path: &Path,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        let limit = limits.max_pixels;
        return Err(ImageError::TooManyPixels {
            path: path.to_path_buf(),
            width,
            height,
            limit,
        });
    }
    Ok(())
}

const JPEG_SOI: [u8; 2] = [0xFF, 0xD8];
const JPEG_EOI: u8 = 0xD9;
const JPEG_SOS: u8 = 0xDA;

/// Whether a JPEG stream reaches its end-of-image marker.
///
/// The JPEG decoder fills a truncated image with grey instead of failing, so
/// the structure is walked here: marker segments are skipped by their length
/// up to each start-of-scan, entropy-coded data is skipped up to the next
/// marker (`FF 00` stuffing and restart markers stay inside it), and the walk
/// must meet EOI before the data runs out. Markers inside an embedded EXIF
/// thumbnail sit inside an APP segment and are skipped with it.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1, // fill byte
            JPEG_EOI => return true,
            0x01 | 0xD0..=0xD7 => i += 2, // stand-alone markers
            _ => {
                let Some(len) = bytes
                    .get(i + 2..i + 4)
                    .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                else {
                    return false;
                };
                i += 2 + len;
                if marker == JPEG_SOS {
                    i = skip_entropy_coded(bytes, i);
                }
            }
        }
    }
    false
}

/// Index of the first marker after entropy-coded data starting at `i`.
fn skip_entropy_coded(bytes: &[u8], mut i: usize) -> usize {
    while i + 1 < bytes.len() {
        if bytes[i] == 0xFF && !matches!(bytes[i + 1], 0x00 | 0xD0..=0xD7 | 0xFF) {
            return i;
        }
        i += 1;
    }
    bytes.len()
}

/// File extensions treated as images when a folder is listed.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Whether a path has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("beltad-image-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn png_bytes(image: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn grayscale_is_replicated_to_rgb() {
        let gray = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 10 + y) as u8]));
        let path = temp_file("gray.png", &png_bytes(DynamicImage::ImageLuma8(gray)));
        let rgb = load_rgb(&path, &DecodeLimits::default()).unwrap();
        assert_eq!(rgb.dimensions(), (3, 2));
        assert_eq!(rgb.get_pixel(2, 1).0, [21, 21, 21]);
    }

    #[test]
    fn empty_and_truncated_files_are_named_errors() {
        let empty = temp_file("empty.png", b"");
        assert!(matches!(
            load_rgb(&empty, &DecodeLimits::default()),
            Err(ImageError::Empty { .. })
        ));

        let full = png_bytes(DynamicImage::new_rgb8(16, 16));
        let cut = temp_file("cut.png", &full[..full.len() / 2]);
        let err = load_rgb(&cut, &DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, ImageError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("cut.png"));
    }

    fn jpeg_bytes() -> Vec<u8> {
        let rgb = RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
        });
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(rgb)
            .write_to(&mut out, image::ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    }

    #[test]
    fn truncated_jpeg_is_refused_not_filled_with_grey() {
        let full = jpeg_bytes();
        assert!(jpeg_is_complete(&full));
        let path = temp_file("whole.jpg", &full);
        assert!(load_rgb(&path, &DecodeLimits::default()).is_ok());
        for keep in [full.len() - 2, full.len() / 2, 200, 30, 3] {
            let path = temp_file("part.jpg", &full[..keep]);
            let err = load_rgb(&path, &DecodeLimits::default()).unwrap_err();
            assert!(
                matches!(err, ImageError::Decode { .. }),
                "kept {keep}: {err}"
            );
        }
    }

    #[test]
    fn decode_errors_are_one_line() {
        let full = jpeg_bytes();
        for keep in [full.len() / 2, 200, 30] {
            let path = temp_file("one-line.jpg", &full[..keep]);
            let err = load_rgb(&path, &DecodeLimits::default())
                .unwrap_err()
                .to_string();
            assert!(
                !err.contains('\n') && err == err.trim(),
                "kept {keep}: {err:?}"
            );
        }
    }

    #[test]
    fn devices_and_folders_are_not_read() {
        for path in ["/dev/zero", "/"] {
            let err = load_rgb(Path::new(path), &DecodeLimits::default()).unwrap_err();
            assert!(matches!(err, ImageError::Read { .. }), "{path}: {err}");
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }

    #[test]
    fn trailing_bytes_after_a_jpeg_are_accepted() {
        let mut bytes = jpeg_bytes();
        bytes.extend_from_slice(b"camera trailer");
        let path = temp_file("trailer.jpg", &bytes);
        assert!(load_rgb(&path, &DecodeLimits::default()).is_ok());
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        let path = temp_file("big.png", &png_bytes(DynamicImage::new_rgb8(100, 100)));
        let limits = DecodeLimits {
            max_pixels: 9_999,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            load_rgb(&path, &limits),
            Err(ImageError::TooManyPixels { .. })
        ));
    }

    #[test]
    fn mask_of_the_wrong_size_is_refused() {
        let mask = temp_file("m.png", &png_bytes(DynamicImage::new_luma8(4, 4)));
        let err = load_mask(&mask, (5, 4), &DecodeLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::MaskSize {
                    mask_w: 4,
                    image_w: 5,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn mask_is_thresholded_at_the_middle() {
        let gray = image::GrayImage::from_raw(3, 1, vec![0, 127, 200]).unwrap();
        let path = temp_file("soft.png", &png_bytes(DynamicImage::ImageLuma8(gray)));
        let mask = load_mask(&path, (3, 1), &DecodeLimits::default()).unwrap();
        assert_eq!(mask, vec![false, false, true]);
    }

    #[test]
    fn image_extensions_are_case_insensitive() {
        assert!(has_image_extension(Path::new("a/B.JPG")));
        assert!(!has_image_extension(Path::new("a/notes.txt")));
    }
}
