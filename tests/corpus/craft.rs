//! Byte-level builders of valid and malformed image files for the corpus:
//! PNG chunks (with CRC-32 and stored zlib blocks, so any header field can
//! be set by hand), minimal TIFF files, and header patches of encoded JPEG
//! and BMP files.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};

/// An image encoded by the `image` crate.
pub fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encodable");
    out.into_inner()
}

/// A `w`×`h` RGB test picture with some structure (gradients and a square).
pub fn picture(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let inside = (w / 4..3 * w / 4).contains(&x) && (h / 4..3 * h / 4).contains(&y);
        let r = (x * 255 / w.max(1)) as u8;
        let g = (y * 255 / h.max(1)) as u8;
        image::Rgb([r, g, if inside { 200 } else { 40 }])
    })
}

/// CRC-32 (IEEE, reflected), as PNG chunks use.
pub fn crc32(bytes: &[u8]) -> u32 {
    const POLY: u32 = 0xEDB8_8320;
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zlib stream of stored (uncompressed) blocks.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 65_535;
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(MAX_BLOCK).collect()
    };
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// One PNG chunk: length, type, data, CRC over type and data.
pub fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// IHDR data: size, bit depth, colour type, no interlace.
pub fn ihdr(w: u32, h: u32, depth: u8, color: u8) -> Vec<u8> {
    let mut d = w.to_be_bytes().to_vec();
    d.extend_from_slice(&h.to_be_bytes());
    d.extend_from_slice(&[depth, color, 0, 0, 0]);
    d
}

/// A PNG from an IHDR, extra chunks before the image data, and raw
/// scanlines (each starting with its filter byte).
pub fn png(ihdr_data: &[u8], extra: &[Vec<u8>], scanlines: &[u8]) -> Vec<u8> {
    let mut out = PNG_SIGNATURE.to_vec();
    out.extend(png_chunk(b"IHDR", ihdr_data));
    for chunk in extra {
        out.extend_from_slice(chunk);
    }
    out.extend(png_chunk(b"IDAT", &zlib_stored(scanlines)));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

/// Unfiltered scanlines of `rows` rows of `row_bytes` bytes, filled by `f(row, i)`.
pub fn scanlines(rows: usize, row_bytes: usize, f: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * (row_bytes + 1));
    for r in 0..rows {
        out.push(0);
        out.extend((0..row_bytes).map(|i| f(r, i)));
    }
    out
}

/// A PNG whose header claims `w`×`h` RGB pixels but whose data is one short row.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    png(&ihdr(w, h, 8, 2), &[], &scanlines(1, 3, |_, _| 0))
}

/// The index of the first byte of the first chunk of `kind` (its length field).
pub fn find_chunk(png: &[u8], kind: &[u8; 4]) -> usize {
    png.windows(4)
        .position(|w| w == kind)
        .expect("chunk present")
        - 4
}

/// Tags of a minimal baseline TIFF.
const TIFF_WIDTH: u16 = 256;
const TIFF_HEIGHT: u16 = 257;
const TIFF_BITS: u16 = 258;
const TIFF_COMPRESSION: u16 = 259;
const TIFF_PHOTOMETRIC: u16 = 262;
const TIFF_STRIP_OFFSETS: u16 = 273;
const TIFF_SAMPLES: u16 = 277;
const TIFF_ROWS_PER_STRIP: u16 = 278;
const TIFF_STRIP_BYTES: u16 = 279;
const TIFF_SHORT: u16 = 3;
const TIFF_LONG: u16 = 4;

/// Fields of a minimal one-strip TIFF.
pub struct Tiff {
    pub width: u32,
    pub height: u32,
    pub samples: u16,
    pub bits: u16,
    /// 1: black is zero; 2: RGB; 5: CMYK.
    pub photometric: u16,
    pub compression: u16,
    /// Where the strip's data is said to be; `None`: right after the header.
    pub strip_offset: Option<u32>,
    /// Bytes the strip is said to hold; `None`: the data's length.
    pub strip_bytes: Option<u32>,
    pub data: Vec<u8>,
}

impl Tiff {
    /// An uncompressed 8-bit image of `samples` channels filled with a ramp.
    pub fn new(width: u32, height: u32, samples: u16, photometric: u16) -> Self {
        let len = (width * height) as usize * usize::from(samples);
        Self {
            width,
            height,
            samples,
            bits: 8,
            photometric,
            compression: 1,
            strip_offset: None,
            strip_bytes: None,
            data: (0..len).map(|i| (i * 7 % 251) as u8).collect(),
        }
    }

    /// Little-endian file: header, pixel data, then the IFD (bits per sample
    /// as one SHORT per sample, stored out of line when there are more than two).
    pub fn bytes(&self) -> Vec<u8> {
        const HEADER: usize = 8;
        let data_at = HEADER as u32;
        let bits_at = data_at + self.data.len() as u32;
        let bits_array: Vec<u8> = (0..self.samples)
            .flat_map(|_| self.bits.to_le_bytes())
            .collect();
        let ifd_at = bits_at + bits_array.len() as u32 + (bits_array.len() as u32 & 1);
        let bits_value = if self.samples <= 2 {
            let mut v = [0u8; 4];
            v[..bits_array.len()].copy_from_slice(&bits_array);
            u32::from_le_bytes(v)
        } else {
            bits_at
        };
        let entries: [(u16, u16, u32, u32); 9] = [
            (TIFF_WIDTH, TIFF_LONG, 1, self.width),
            (TIFF_HEIGHT, TIFF_LONG, 1, self.height),
            (TIFF_BITS, TIFF_SHORT, u32::from(self.samples), bits_value),
            (TIFF_COMPRESSION, TIFF_SHORT, 1, u32::from(self.compression)),
            (TIFF_PHOTOMETRIC, TIFF_SHORT, 1, u32::from(self.photometric)),
            (
                TIFF_STRIP_OFFSETS,
                TIFF_LONG,
                1,
                self.strip_offset.unwrap_or(data_at),
            ),
            (TIFF_SAMPLES, TIFF_SHORT, 1, u32::from(self.samples)),
            (TIFF_ROWS_PER_STRIP, TIFF_LONG, 1, self.height),
            (
                TIFF_STRIP_BYTES,
                TIFF_LONG,
                1,
                self.strip_bytes.unwrap_or(self.data.len() as u32),
            ),
        ];
        let mut out = b"II*\0".to_vec();
        out.extend_from_slice(&ifd_at.to_le_bytes());
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&bits_array);
        out.resize(ifd_at as usize, 0);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (tag, kind, count, value) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            if kind == TIFF_SHORT && count == 1 {
                out.extend_from_slice(&(value as u16).to_le_bytes());
                out.extend_from_slice(&[0, 0]);
            } else {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        out.extend_from_slice(&0u32.to_le_bytes());
        out
    }
}

/// A JPEG whose start-of-frame says `w`×`h` (the scan data is unchanged).
pub fn jpeg_claiming(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = out
        .windows(2)
        .position(|m| m[0] == 0xFF && matches!(m[1], 0xC0 | 0xC2))
        .expect("a start-of-frame marker");
    // FF C0, length (2), precision (1), height (2), width (2).
    out[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    out
}

/// Offsets of fields in a BMP's file and info headers.
pub const BMP_DATA_OFFSET: usize = 10;
pub const BMP_WIDTH: usize = 18;
pub const BMP_HEIGHT: usize = 22;
pub const BMP_BITS: usize = 28;
pub const BMP_COMPRESSION: usize = 30;

/// `bmp` with the little-endian `u32` at `at` replaced.
pub fn bmp_with(bmp: &[u8], at: usize, value: u32) -> Vec<u8> {
    let mut out = bmp.to_vec();
    out[at..at + 4].copy_from_slice(&value.to_le_bytes());
    out
}

/// `bmp` with the little-endian `u16` at `at` replaced.
pub fn bmp_with_u16(bmp: &[u8], at: usize, value: u16) -> Vec<u8> {
    let mut out = bmp.to_vec();
    out[at..at + 2].copy_from_slice(&value.to_le_bytes());
    out
}

/// `bytes` with every `stride`-th byte from `start` inverted.
pub fn scrambled(bytes: &[u8], start: usize, stride: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for b in out.iter_mut().skip(start).step_by(stride) {
        *b = !*b;
    }
    out
}

#[test]
fn crc32_matches_the_png_reference_value() {
    // CRC of the IEND chunk type, as every PNG file ends with it.
    assert_eq!(crc32(b"IEND"), 0xAE42_6082);
}

#[test]
fn crafted_png_and_tiff_decode() {
    let gray = png(
        &ihdr(3, 2, 8, 0),
        &[],
        &scanlines(2, 3, |r, i| (r * 3 + i) as u8),
    );
    let decoded = image::load_from_memory(&gray).unwrap().to_luma8();
    assert_eq!(decoded.as_raw(), &vec![0, 1, 2, 3, 4, 5]);
    let tiff = Tiff::new(4, 3, 3, 2).bytes();
    let decoded = image::load_from_memory(&tiff).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (4, 3));
    assert_eq!(decoded.as_raw()[..4], [0, 7, 14, 21]);
}
