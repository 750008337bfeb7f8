//! The malformed-input corpus, run through the real `beltad` binary.
//!
//! Every case is either refused with a clear message that names the file and
//! the problem (exit code 1, or a per-image error with exit code 3 from
//! `predict`) or handled as the valid input it is; none may panic or hang.
//! Cases are built here byte by byte (see `corpus/craft.rs`) or read from
//! `tests/corpus/fixtures/` (files the `image` crate cannot encode: CMYK and
//! progressive JPEG, CMYK/LZW/PackBits TIFF, palette and bilevel BMP,
//! 4-bit palette PNG). One small model is fitted for the whole file and
//! shared by the test functions.
//!
//! Each test prints `corpus: <group>: <n> cases`; run with `--nocapture`
//! to see the counts (317 in all when this was written).

mod util;

#[path = "corpus/craft.rs"]
mod craft;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use image::{DynamicImage, ImageFormat};

use beltad::model_file::{DType, ModelFile, StoredTensor};
use craft::*;
use util::{
    assert_clean_error, beltad, beltad_with_weights, file_names, mini_dataset, s, shared,
    small_config, temp_dir, text,
};

/// What a case must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Handled as valid input.
    Valid,
    /// Refused with a message naming the file and containing this text.
    Refused(&'static str),
}
use Expect::{Refused, Valid};

/// One input file of the corpus.
struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: &str, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.to_string(),
        bytes,
        expect,
    }
}

/// A case that must be handled as valid.
fn ok(name: &str, bytes: Vec<u8>) -> Case {
    case(name, bytes, Valid)
}

/// A case that must be refused with `needle` in its message.
fn bad(name: &str, bytes: Vec<u8>, needle: &'static str) -> Case {
    case(name, bytes, Refused(needle))
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn report(group: &str, n: usize) {
    println!("corpus: {group}: {n} cases");
}

/// Asserts that no panic reached stderr.
fn assert_no_panic(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

/// Asserts a clean refusal of `case`: exit code 1 and one `error:` line
/// holding every needle, no panic.
fn assert_refused(out: &Output, case: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_panic(out);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    let ok = out.status.code() == Some(1)
        && errors.len() == 1
        && needles.iter().all(|n| errors[0].contains(n));
    assert!(
        ok,
        "{case}: expected exit 1 and one error naming {needles:?}, got {:?}: {}",
        out.status.code(),
        text(out)
    );
}

/// The model shared by every test of this file, fitted once.
struct Fitted {
    dir: PathBuf,
    data: PathBuf,
    model: PathBuf,
    bytes: Vec<u8>,
}

/// Valid but unusual images added to the training set of the shared model,
/// so that fitting on them is checked too.
fn unusual_training_images() -> Vec<Case> {
    let rgb = picture(40, 30);
    vec![
        ok("z_cmyk.jpg", fixture("cmyk.jpg")),
        ok(
            "z_gray16.png",
            encode(
                DynamicImage::ImageRgb8(rgb.clone()).into_luma16().into(),
                ImageFormat::Png,
            ),
        ),
        ok("z_palette.bmp", fixture("palette8.bmp")),
        ok(
            "z_tiny.png",
            encode(DynamicImage::new_rgb8(1, 1), ImageFormat::Png),
        ),
    ]
}

fn fitted() -> &'static Fitted {
    static FITTED: OnceLock<Fitted> = OnceLock::new();
    FITTED.get_or_init(|| {
        let dir = temp_dir("corpus");
        let data = mini_dataset(&dir);
        for c in unusual_training_images() {
            std::fs::write(data.join("train/good").join(&c.name), &c.bytes).unwrap();
        }
        let model = dir.join("m.beltad");
        let out = run(&fit_args(&data, &model, &small_config(&dir)));
        assert!(out.status.success(), "fit failed: {}", text(&out));
        let bytes = std::fs::read(&model).unwrap();
        Fitted {
            dir,
            data,
            model,
            bytes,
        }
    })
}

fn fit_args(data: &Path, model: &Path, config: &Path) -> Vec<String> {
    util::fit_args(data, model, config)
        .into_iter()
        .map(String::from)
        .collect()
}

fn run(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    beltad(&args)
}

/// A fresh folder inside the shared model's folder.
fn sub_dir(name: &str) -> PathBuf {
    let dir = fitted().dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The first test image of the mini data set: a real 256×256 JPEG.
fn real_image() -> PathBuf {
    let good = fitted().data.join("test/good");
    good.join(&file_names(&good)[0])
}

// ---------------------------------------------------------------- images

/// Valid images of every kind beltad reads.
#[rustfmt::skip]
fn valid_images() -> Vec<Case> {
    let rgb = picture(64, 48);
    let dynamic = DynamicImage::ImageRgb8(rgb.clone());
    let png = |img: DynamicImage| encode(img, ImageFormat::Png);
    let jpeg = encode(dynamic.clone(), ImageFormat::Jpeg);
    let bmp = encode(dynamic.clone(), ImageFormat::Bmp);
    let mut trailer = jpeg.clone();
    trailer.extend_from_slice(b"camera trailer after EOI");
    let palette = [
        png_chunk(b"PLTE", &[0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]),
        png_chunk(b"tRNS", &[255, 128, 0]),
    ];
    let bilevel_rows = scanlines(8, 2, |r, i| (r * 37 + i) as u8);
    let palette_rows = scanlines(4, 6, |r, i| ((r + i) % 4) as u8);
    vec![
        ok("rgb8.png", png(dynamic.clone())),
        ok("rgba8.png", png(dynamic.to_rgba8().into())),
        ok("gray8.png", png(dynamic.to_luma8().into())),
        ok("gray_alpha8.png", png(dynamic.to_luma_alpha8().into())),
        ok("rgb16.png", png(dynamic.to_rgb16().into())),
        ok("rgba16.png", png(dynamic.to_rgba16().into())),
        ok("gray16.png", png(dynamic.to_luma16().into())),
        ok("gray_alpha16.png", png(dynamic.to_luma_alpha16().into())),
        ok("bilevel.png", craft::png(&ihdr(16, 8, 1, 0), &[], &bilevel_rows)),
        ok("palette_alpha.png", craft::png(&ihdr(6, 4, 8, 3), &palette, &palette_rows)),
        ok("palette4.png", fixture("palette4.png")),
        ok("one_pixel.png", png(DynamicImage::new_rgb8(1, 1))),
        ok("two_pixels.png", png(DynamicImage::new_rgb8(2, 1))),
        ok("column_1x10000.png", png(picture(1, 10_000).into())),
        ok("row_10000x1.png", png(picture(10_000, 1).into())),
        // Resized columns first: rows first would need 1e6 × eval_size floats.
        ok("sliver_1x1000000.png", png(DynamicImage::new_luma8(1, 1_000_000))),
        ok("UPPER_CASE.PNG", png(dynamic.clone())),
        ok("png_named.jpg", png(dynamic.clone())),
        ok("jpeg_named.png", jpeg.clone()),
        ok("bmp_named.tif", bmp.clone()),
        ok("rgb.jpg", jpeg.clone()),
        ok("gray.jpg", encode(dynamic.to_luma8().into(), ImageFormat::Jpeg)),
        ok("cmyk.jpg", fixture("cmyk.jpg")),
        ok("progressive.jpg", fixture("progressive.jpg")),
        ok("trailer.jpeg", trailer),
        ok("rgb.bmp", bmp.clone()),
        ok("rgba.bmp", encode(dynamic.to_rgba8().into(), ImageFormat::Bmp)),
        ok("gray.bmp", encode(dynamic.to_luma8().into(), ImageFormat::Bmp)),
        ok("palette8.bmp", fixture("palette8.bmp")),
        ok("bilevel.bmp", fixture("bilevel.bmp")),
        ok("top_down.bmp", bmp_with(&bmp, BMP_HEIGHT, (-48i32) as u32)),
        ok("rgb.tif", encode(dynamic.clone(), ImageFormat::Tiff)),
        ok("rgba.tiff", encode(dynamic.to_rgba8().into(), ImageFormat::Tiff)),
        ok("gray16.tif", encode(dynamic.to_luma16().into(), ImageFormat::Tiff)),
        ok("rgb16.tif", encode(dynamic.to_rgb16().into(), ImageFormat::Tiff)),
        ok("minimal_gray.tif", Tiff::new(9, 7, 1, 1).bytes()),
        ok("cmyk.tif", fixture("cmyk.tif")),
        ok("lzw.tif", fixture("lzw.tif")),
        ok("packbits.tif", fixture("packbits.tif")),
    ]
}

const UNREADABLE: &str = "not a readable image";
const EMPTY: &str = "empty file";
const OVER_LIMIT: &str = "exceeds the limit";
const TRUNCATED_JPEG: &str = "JPEG data ends before its end-of-image marker";

/// Broken, truncated, disguised and oversized image files.
#[rustfmt::skip]
fn invalid_images() -> Vec<Case> {
    let dynamic = DynamicImage::ImageRgb8(picture(64, 48));
    let png = encode(dynamic.clone(), ImageFormat::Png);
    let jpeg = encode(dynamic.clone(), ImageFormat::Jpeg);
    let bmp = encode(dynamic.clone(), ImageFormat::Bmp);
    let tiff = encode(dynamic.clone(), ImageFormat::Tiff);
    let idat = find_chunk(&png, b"IDAT");
    let iend = find_chunk(&png, b"IEND");
    let sos = jpeg.windows(2).position(|m| m == [0xFF, 0xDA]).unwrap();
    let dht = jpeg.windows(2).position(|m| m == [0xFF, 0xC4]).unwrap();
    let noise: Vec<u8> = (0..1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let gray_rows = |rows: usize| scanlines(rows, 4, |_, _| 9);
    let bmp_sized = |side: u32| bmp_with(&bmp_with(&bmp, BMP_WIDTH, side), BMP_HEIGHT, side);
    let tiff_with = |edit: &dyn Fn(&mut Tiff)| {
        let mut t = Tiff::new(8, 6, 3, 2);
        edit(&mut t);
        t.bytes()
    };
    let mut bad_crc = png.clone();
    bad_crc[8 + 4 + 4 + 13] ^= 0xFF; // IHDR's CRC
    let mut bad_idat_byte = png.clone();
    bad_idat_byte[idat + 8 + 10] ^= 0x40;
    let mut huge_chunk = png.clone();
    huge_chunk[idat..idat + 4].copy_from_slice(&0x7FFF_FFF0u32.to_be_bytes());

    vec![
        // Empty and disguised files.
        bad("empty.png", Vec::new(), EMPTY),
        bad("empty.jpg", Vec::new(), EMPTY),
        bad("empty.bmp", Vec::new(), EMPTY),
        bad("empty.tif", Vec::new(), EMPTY),
        bad("text_named.png", b"these are not pixels\n".to_vec(), UNREADABLE),
        bad("text_named.jpg", b"neither are these\n".to_vec(), UNREADABLE),
        bad("text_named.tiff", b"II* but not a tiff".to_vec(), UNREADABLE),
        bad("noise.png", noise.clone(), UNREADABLE),
        bad("zeros.jpg", vec![0; 1000], UNREADABLE),
        bad("gif_named.png", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(), UNREADABLE),
        bad("webp_named.png", b"RIFF\x1a\x00\x00\x00WEBPVP8 ".to_vec(), UNREADABLE),
        // PNG.
        bad("png_signature_only.png", PNG_SIGNATURE.to_vec(), UNREADABLE),
        bad("png_header_only.png", png[..idat].to_vec(), UNREADABLE),
        bad("png_cut_in_data.png", png[..idat + 40].to_vec(), UNREADABLE),
        bad("png_cut_at_quarter.png", png[..png.len() / 4].to_vec(), UNREADABLE),
        bad("png_cut_at_half.png", png[..png.len() / 2].to_vec(), UNREADABLE),
        bad("png_cut_before_end.png", png[..iend].to_vec(), UNREADABLE),
        bad("png_bad_header_crc.png", bad_crc, UNREADABLE),
        bad("png_flipped_data_byte.png", bad_idat_byte, UNREADABLE),
        bad("png_chunk_length_2gb.png", huge_chunk, UNREADABLE),
        bad("png_zero_width.png", craft::png(&ihdr(0, 4, 8, 0), &[], &gray_rows(4)), UNREADABLE),
        bad("png_bit_depth_3.png", craft::png(&ihdr(4, 4, 3, 0), &[], &gray_rows(4)), UNREADABLE),
        bad("png_colour_type_5.png", craft::png(&ihdr(4, 4, 8, 5), &[], &gray_rows(4)), UNREADABLE),
        bad("png_no_plte.png", craft::png(&ihdr(4, 4, 8, 3), &[], &gray_rows(4)), UNREADABLE),
        bad("png_too_few_rows.png", craft::png(&ihdr(4, 40, 8, 0), &[], &gray_rows(4)), UNREADABLE),
        bad("png_bomb_100000x100000.png", png_claiming(100_000, 100_000), OVER_LIMIT),
        bad("png_bomb_just_over.png", png_claiming(8193, 8192), OVER_LIMIT),
        // The PNG decoder's own allocation limit answers first here.
        bad("png_bomb_2g_wide.png", png_claiming(0x7FFF_FFFF, 1), UNREADABLE),
        // JPEG.
        bad("jpeg_soi_only.jpg", jpeg[..2].to_vec(), UNREADABLE),
        bad("jpeg_cut_in_header.jpg", jpeg[..dht + 10].to_vec(), UNREADABLE),
        bad("jpeg_cut_at_scan.jpg", jpeg[..sos + 4].to_vec(), UNREADABLE),
        bad("jpeg_cut_at_half.jpg", jpeg[..jpeg.len() / 2].to_vec(), UNREADABLE),
        bad("jpeg_no_eoi.jpg", jpeg[..jpeg.len() - 2].to_vec(), TRUNCATED_JPEG),
        bad("jpeg_zero_width.jpg", jpeg_claiming(&jpeg, 0, 48), UNREADABLE),
        bad("jpeg_bomb_65535.jpg", jpeg_claiming(&jpeg, 65_535, 65_535), OVER_LIMIT),
        bad("jpeg_bomb_wide.jpg", jpeg_claiming(&jpeg, 65_535, 1025), OVER_LIMIT),
        bad("jpeg_scrambled_tables.jpg", scrambled(&jpeg, dht + 4, 3), UNREADABLE),
        // BMP.
        bad("bmp_header_only.bmp", bmp[..54].to_vec(), UNREADABLE),
        bad("bmp_cut_at_half.bmp", bmp[..bmp.len() / 2].to_vec(), UNREADABLE),
        // The BMP decoder refuses sides over 65535 itself.
        bad("bmp_bomb_100000.bmp", bmp_sized(100_000), UNREADABLE),
        bad("bmp_bomb_60000.bmp", bmp_sized(60_000), OVER_LIMIT),
        bad("bmp_zero_width.bmp", bmp_with(&bmp, BMP_WIDTH, 0), UNREADABLE),
        bad("bmp_negative_width.bmp", bmp_with(&bmp, BMP_WIDTH, (-64i32) as u32), UNREADABLE),
        bad("bmp_7_bits.bmp", bmp_with_u16(&bmp, BMP_BITS, 7), UNREADABLE),
        bad("bmp_compression_9.bmp", bmp_with(&bmp, BMP_COMPRESSION, 9), UNREADABLE),
        bad("bmp_data_past_end.bmp", bmp_with(&bmp, BMP_DATA_OFFSET, 1 << 30), UNREADABLE),
        // TIFF.
        bad("tiff_header_only.tif", b"II*\0\x08\0\0\0".to_vec(), UNREADABLE),
        bad("tiff_ifd_past_end.tif", b"II*\0\xff\xff\xff\x0f".to_vec(), UNREADABLE),
        bad("tiff_cut_at_half.tif", tiff[..tiff.len() / 2].to_vec(), UNREADABLE),
        bad("tiff_big_endian_mark.tif", [b"MM\0*".as_slice(), &tiff[4..]].concat(), UNREADABLE),
        bad("tiff_bomb.tif", tiff_with(&|t| (t.width, t.height) = (100_000, 100_000)), OVER_LIMIT),
        bad("tiff_zero_height.tif", tiff_with(&|t| t.height = 0), UNREADABLE),
        bad("tiff_strip_past_end.tif", tiff_with(&|t| t.strip_offset = Some(1 << 30)), UNREADABLE),
        bad("tiff_strip_too_long.tif", tiff_with(&|t| t.strip_bytes = Some(u32::MAX)), UNREADABLE),
        bad("tiff_3_bits.tif", tiff_with(&|t| t.bits = 3), UNREADABLE),
        bad("tiff_compression_99.tif", tiff_with(&|t| t.compression = 99), UNREADABLE),
        bad("tiff_photometric_99.tif", tiff_with(&|t| t.photometric = 99), UNREADABLE),
        bad("tiff_zero_samples.tif", tiff_with(&|t| t.samples = 0), UNREADABLE),
    ]
}

/// Writes `cases` into `dir`.
fn write_cases(dir: &Path, cases: &[Case]) {
    std::fs::create_dir_all(dir).unwrap();
    for c in cases {
        std::fs::write(dir.join(&c.name), &c.bytes).unwrap();
    }
}

/// Rows of a predict run's scores.jsonl, by image file name.
fn score_rows(out_dir: &Path) -> HashMap<String, serde_json::Value> {
    let lines = std::fs::read_to_string(out_dir.join("scores.jsonl")).unwrap();
    lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|row| {
            let image = row["image"].as_str().unwrap().to_string();
            let name = Path::new(&image)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, row)
        })
        .collect()
}

/// Checks every case's row of a predict run.
fn check_rows(out: &Output, out_dir: &Path, cases: &[Case]) {
    assert_no_panic(out);
    let failures = cases.iter().filter(|c| c.expect != Valid).count();
    let want_code = if failures > 0 { 3 } else { 0 };
    assert_eq!(out.status.code(), Some(want_code), "{}", text(out));
    let rows = score_rows(out_dir);
    assert_eq!(rows.len(), cases.len(), "one row per case");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut wrong = Vec::new();
    for c in cases {
        let row = &rows[&c.name];
        let error = row["error"].as_str().unwrap_or("");
        let score = row["score"].as_f64();
        let ok = match c.expect {
            Valid => {
                error.is_empty()
                    && score.is_some_and(f64::is_finite)
                    && row["heatmap"]
                        .as_str()
                        .is_some_and(|h| out_dir.join(h).is_file())
            }
            Refused(needle) => {
                error.contains(&c.name)
                    && error.contains(needle)
                    && !error.contains('\n')
                    && score.is_none()
                    && stderr
                        .lines()
                        .any(|l| l.starts_with("warning: ") && l.contains(&c.name))
            }
        };
        if !ok {
            wrong.push(format!("{} (expected {:?}): {row}", c.name, c.expect));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cases wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

fn predict_args(model: &Path, out: &Path, inputs: &[&Path], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["-q", "predict", "--model", s(model), "--out", s(out)]
        .map(String::from)
        .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(inputs.iter().map(|p| s(p).to_string()));
    args
}

#[test]
fn images_valid_and_invalid_through_predict() {
    let f = fitted();
    let dir = sub_dir("images");
    let valid = valid_images();
    let invalid = invalid_images();
    let all: Vec<Case> = valid.into_iter().chain(invalid).collect();
    let inputs = dir.join("inputs");
    write_cases(&inputs, &all);

    let preds = dir.join("preds");
    let out = run(&predict_args(&f.model, &preds, &[&inputs], &[]));
    check_rows(&out, &preds, &all);
    // Heatmaps keep the image's own size, however extreme.
    let heat = image::open(preds.join("heatmaps/column_1x10000.png")).unwrap();
    assert_eq!((heat.width(), heat.height()), (1, 10_000));
    report("images through predict", all.len());
}

#[test]
fn images_over_the_configured_limits() {
    let f = fitted();
    let dir = sub_dir("limits");
    let picture = encode(DynamicImage::ImageRgb8(picture(64, 48)), ImageFormat::Png);
    let cases = [
        (
            vec!["--max-pixels", "3071"],
            "exceeds the limit of 3071 pixels",
        ),
        (
            vec!["--max-file-bytes", "100"],
            "exceeds the limit of 100 bytes",
        ),
    ];
    for (flags, needle) in &cases {
        let inputs = dir.join("inputs");
        let case_list = [
            bad("just_over.png", picture.clone(), needle),
            ok(
                "tiny.png",
                encode(DynamicImage::new_rgb8(1, 1), ImageFormat::Png),
            ),
        ];
        write_cases(&inputs, &case_list);
        let preds = dir.join(format!("preds{}", flags[0]));
        let out = run(&predict_args(&f.model, &preds, &[&inputs], flags));
        check_rows(&out, &preds, &case_list);
    }
    // More images than --max-images: refused before any is read.
    let out = run(&predict_args(
        &f.model,
        &dir.join("p"),
        &[&dir.join("inputs")],
        &["--max-images", "1"],
    ));
    assert_refused(&out, "--max-images", &["2 images exceed --max-images 1"]);
    assert!(!dir.join("p/scores.jsonl").exists());

    // The same limits hold for masks and training images.
    let eval = eval_set(&dir.join("eval"));
    let out = run(&eval_args(&f.model, &eval, &["--max-pixels", "60000"]));
    assert_clean_error(&out, "exceeds the limit of 60000 pixels");
    let out = run(&[
        fit_args(&f.data, &dir.join("m.beltad"), &small_config(&dir)),
        vec!["--max-file-bytes".into(), "1000".into()],
    ]
    .concat());
    assert_clean_error(&out, "exceeds the limit of 1000 bytes");
    assert!(!dir.join("m.beltad").exists());
    report("limits", cases.len() + 3);
}

#[test]
fn unreadable_training_images_stop_the_fit() {
    let f = fitted();
    let dir = sub_dir("fit-images");
    let config = small_config(&dir);
    let model = dir.join("m.beltad");
    std::fs::write(&model, b"an older model").unwrap();
    let dynamic = DynamicImage::ImageRgb8(picture(32, 32));
    let png = encode(dynamic.clone(), ImageFormat::Png);
    let jpeg = encode(dynamic, ImageFormat::Jpeg);
    // Named to sort first, so the fit fails on its first batch.
    let cases = [
        bad("000_cut.png", png[..png.len() / 2].to_vec(), UNREADABLE),
        bad("000_text.png", b"plain text".to_vec(), UNREADABLE),
        bad("000_empty.jpg", Vec::new(), EMPTY),
        bad(
            "000_cut.jpg",
            jpeg[..jpeg.len() - 2].to_vec(),
            TRUNCATED_JPEG,
        ),
        bad("000_bomb.png", png_claiming(100_000, 100_000), OVER_LIMIT),
        bad(
            "000_bomb.tif",
            Tiff {
                width: 70_000,
                height: 70_000,
                ..Tiff::new(1, 1, 1, 1)
            }
            .bytes(),
            OVER_LIMIT,
        ),
    ];
    let train = f.data.join("train/good");
    let data = dir.join("data");
    for c in &cases {
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        for name in file_names(&train) {
            std::os::unix::fs::symlink(train.join(&name), data.join(&name)).unwrap();
        }
        std::fs::write(data.join(&c.name), &c.bytes).unwrap();
        let out = run(&fit_args(&data, &model, &config));
        let Refused(needle) = c.expect else {
            unreachable!()
        };
        assert_refused(&out, &c.name, &[&c.name, needle]);
        assert_eq!(std::fs::read(&model).unwrap(), b"an older model");
    }
    assert_eq!(
        file_names(&dir),
        vec!["data", "m.beltad", "small.toml"],
        "temporary files left"
    );
    report("training images", cases.len());
}

// ---------------------------------------------------------------- masks and layouts

/// A minimal MVTec layout: one normal and one defective test image with its mask.
fn eval_set(root: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(root);
    let src = &fitted().data;
    let pick = |sub: &str| {
        let dir = src.join(sub);
        dir.join(&file_names(&dir)[0])
    };
    for (sub, from) in [
        ("test/good", pick("test/good")),
        ("test/hole", pick("test/hole")),
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        std::fs::copy(&from, root.join(sub).join(from.file_name().unwrap())).unwrap();
    }
    let mask = pick("ground_truth/hole");
    std::fs::create_dir_all(root.join("ground_truth/hole")).unwrap();
    std::fs::copy(
        &mask,
        root.join("ground_truth/hole")
            .join(mask.file_name().unwrap()),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("train/good")).unwrap();
    root.to_path_buf()
}

/// The path of the one mask of an [`eval_set`].
fn the_mask(root: &Path) -> PathBuf {
    let dir = root.join("ground_truth/hole");
    dir.join(&file_names(&dir)[0])
}

fn eval_args(model: &Path, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["-q", "eval", "--model", s(model), "--data", s(data)]
        .map(String::from)
        .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// A mask of the real mask's size with `f(x, y)` as its grey levels.
fn mask_like(mask: &Path, f: impl Fn(u32, u32) -> u8) -> image::GrayImage {
    let (w, h) = image::image_dimensions(mask).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
}

#[test]
fn masks_and_mvtec_layouts() {
    let f = fitted();
    let dir = sub_dir("masks");
    let root = dir.join("data");
    let mut n = 0;

    // Valid masks: soft (thresholded at 127), RGB, 16-bit, JPEG content, the
    // `<stem>.png` name, all normal.
    type Edit = Box<dyn Fn(&Path)>;
    let valid: Vec<(&str, Edit)> = vec![
        (
            "soft mask 0..255",
            Box::new(|m| mask_like(m, |x, y| ((x + y) % 256) as u8).save(m).unwrap()),
        ),
        (
            "rgb mask",
            Box::new(|m| {
                let g = mask_like(m, |x, _| if x > 100 { 255 } else { 0 });
                DynamicImage::ImageLuma8(g)
                    .to_rgb8()
                    .save_with_format(m, ImageFormat::Png)
                    .unwrap()
            }),
        ),
        (
            "16-bit mask",
            Box::new(|m| {
                let g = mask_like(m, |_, y| if y > 100 { 255 } else { 0 });
                DynamicImage::ImageLuma8(g)
                    .to_luma16()
                    .save_with_format(m, ImageFormat::Png)
                    .unwrap()
            }),
        ),
        (
            "jpeg mask named .png",
            Box::new(|m| {
                let g = mask_like(m, |x, y| if x > 80 && y > 80 { 255 } else { 0 });
                std::fs::write(m, encode(g.into(), ImageFormat::Jpeg)).unwrap()
            }),
        ),
        (
            "mask named <stem>.png",
            Box::new(|m| {
                let name = m
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .replace("_mask", "");
                std::fs::rename(m, m.with_file_name(name)).unwrap()
            }),
        ),
    ];
    for (what, edit) in &valid {
        eval_set(&root);
        edit(&the_mask(&root));
        let json = dir.join("metrics.json");
        let out = run(&eval_args(&f.model, &root, &["--json", s(&json)]));
        assert_no_panic(&out);
        assert!(out.status.success(), "{what}: {}", text(&out));
        assert!(json.is_file(), "{what}");
        n += 1;
    }

    // Invalid masks: refused with the mask's name.
    let invalid: Vec<(&str, Edit, &str)> = vec![
        (
            "wrong size",
            Box::new(|m| image::GrayImage::new(7, 9).save(m).unwrap()),
            "mask is 7x9",
        ),
        (
            "one pixel",
            Box::new(|m| image::GrayImage::new(1, 1).save(m).unwrap()),
            "mask is 1x1",
        ),
        (
            "empty mask",
            Box::new(|m| std::fs::write(m, b"").unwrap()),
            EMPTY,
        ),
        (
            "text mask",
            Box::new(|m| std::fs::write(m, b"no mask here").unwrap()),
            UNREADABLE,
        ),
        (
            "truncated mask",
            Box::new(|m| {
                let bytes = std::fs::read(m).unwrap();
                std::fs::write(m, &bytes[..bytes.len() / 2]).unwrap()
            }),
            UNREADABLE,
        ),
        (
            "mask bomb",
            Box::new(|m| std::fs::write(m, png_claiming(90_000, 90_000)).unwrap()),
            OVER_LIMIT,
        ),
    ];
    for (what, edit, needle) in &invalid {
        eval_set(&root);
        let mask = the_mask(&root);
        edit(&mask);
        let json = dir.join("bad-metrics.json");
        let out = run(&eval_args(&f.model, &root, &["--json", s(&json)]));
        assert_refused(
            &out,
            what,
            &[needle, mask.file_name().unwrap().to_str().unwrap()],
        );
        assert!(!json.exists(), "{what}: metrics written");
        n += 1;
    }

    // No anomalous pixel in the whole test set: pixel metrics are undefined.
    eval_set(&root);
    let mask = the_mask(&root);
    mask_like(&mask, |_, _| 0).save(&mask).unwrap();
    let out = run(&eval_args(&f.model, &root, &[]));
    assert_refused(&out, "all-normal mask", &["no anomalous sample"]);
    n += 1;

    // Layouts that cannot be evaluated.
    let layouts: Vec<(&str, Edit, &str)> = vec![
        (
            "no ground_truth folder",
            Box::new(|r| std::fs::remove_dir_all(r.join("ground_truth")).unwrap()),
            "no ground-truth mask",
        ),
        (
            "mask of another image",
            Box::new(|r| {
                let m = the_mask(r);
                std::fs::rename(&m, m.with_file_name("other_mask.png")).unwrap()
            }),
            "no ground-truth mask",
        ),
        (
            "no test folder",
            Box::new(|r| std::fs::remove_dir_all(r.join("test")).unwrap()),
            "not an MVTec-layout data set",
        ),
        (
            "no normal test images",
            Box::new(|r| std::fs::remove_dir_all(r.join("test/good")).unwrap()),
            "no normal images",
        ),
        (
            "no defective test images",
            Box::new(|r| std::fs::remove_dir_all(r.join("test/hole")).unwrap()),
            "no anomalous images",
        ),
        (
            "empty defect folder",
            Box::new(|r| std::fs::create_dir_all(r.join("test/scratch")).unwrap()),
            "no images found",
        ),
        (
            "test path is a file",
            Box::new(|r| {
                std::fs::remove_dir_all(r.join("test")).unwrap();
                std::fs::write(r.join("test"), b"").unwrap()
            }),
            "not an MVTec-layout data set",
        ),
    ];
    for (what, edit, needle) in &layouts {
        eval_set(&root);
        edit(&root);
        let out = run(&eval_args(&f.model, &root, &[]));
        assert_refused(&out, what, &[needle, s(&root)]);
        n += 1;
    }
    // `fit` on a folder with neither images nor train/good.
    let out = run(&fit_args(
        &root.join("ground_truth"),
        &dir.join("m.beltad"),
        &small_config(&dir),
    ));
    assert_clean_error(&out, "no images found");
    n += 1;
    report("masks and layouts", n);
}

// ---------------------------------------------------------------- configs

#[test]
fn config_files_with_wrong_types_and_absurd_values() {
    let dir = sub_dir("configs");
    let data = fitted().data.clone();
    let model = dir.join("m.beltad");
    let cases: &[(&str, &str)] = &[
        ("[object]\ntau = -1.0\n", "object.tau"),
        ("[object]\ntau = 0.0\n", "object.tau"),
        ("[object]\ntau = nan\n", "object.tau"),
        ("[object]\ntau = inf\n", "object.tau"),
        ("[object]\ntau = \"high\"\n", "invalid config"),
        ("[object]\ninput_size = -14\n", "invalid config"),
        ("[object]\ninput_size = 0\n", "multiple of 14"),
        ("[object]\ninput_size = 100\n", "multiple of 14"),
        ("[object]\ninput_size = 1414\n", "multiple of 14"),
        (
            "[object]\ninput_size = 99999999999999999999\n",
            "invalid config",
        ),
        ("[object]\ninput_size = 1.5e3\n", "invalid config"),
        ("[object]\nkmeans_restarts = 0\n", "kmeans_restarts"),
        ("[object]\nsigma = -2.0\n", "object.sigma"),
        ("[object]\nsigma = 1e300\n", "object.sigma"),
        (
            "[object]\nbackbone = \"mobilenet_v2\"\n",
            "is not a DINOv2 ViT",
        ),
        ("[object]\nbackbone = \"resnet9000\"\n", "invalid config"),
        (
            "[object]\ncovariance = { sample = { ridge = -1.0 } }\n",
            "ridge",
        ),
        ("[attribution]\ninput_size = 13\n", "multiple of 14"),
        ("[texture]\ninput_size = -3\n", "invalid config"),
        ("[texture]\ninput_size = 8\n", "texture.input_size"),
        ("[texture]\ninput_size = 100000\n", "texture.input_size"),
        ("[texture]\ncoreset_ratio = 0.0\n", "coreset_ratio"),
        ("[texture]\ncoreset_ratio = 1.0000001\n", "coreset_ratio"),
        ("[texture]\ncoreset_ratio = -0.5\n", "coreset_ratio"),
        ("[texture]\ncoreset_ratio = nan\n", "coreset_ratio"),
        (
            "[texture]\nbank_image_fraction = 0.0\n",
            "bank_image_fraction",
        ),
        ("[texture]\nprojection_eps = 1.0\n", "projection_eps"),
        ("[texture]\nreweight_k = 1\n", "reweight_k"),
        ("[texture]\nbackbone = \"dinov2_vits14\"\n", "is not a CNN"),
        ("[fusion]\nlambda_obj = -1.0\n", "lambda_obj"),
        ("[fusion]\nlambda_map = inf\n", "lambda_map"),
        ("[fusion]\nfinal_kernel = 4\n", "final_kernel"),
        ("[fusion]\nfinal_kernel = 1001\n", "final_kernel"),
        ("[fusion]\neval_size = 0\n", "eval_size"),
        ("[fusion]\neval_size = 1000000\n", "eval_size"),
        (
            "[calibration]\nholdout_fraction = 1.0\n",
            "holdout_fraction",
        ),
        (
            "[calibration]\nholdout_fraction = -0.1\n",
            "holdout_fraction",
        ),
        (
            "[calibration]\nthreshold_quantile = 0.0\n",
            "threshold_quantile",
        ),
        (
            "[calibration]\nthreshold_quantile = 1.5\n",
            "threshold_quantile",
        ),
        ("seed = -1\n", "invalid config"),
        ("seed = 1.5\n", "invalid config"),
        ("seed = \"one\"\n", "invalid config"),
        ("preset = \"fastest\"\n", "invalid config"),
        ("[object]\ntaux = 1.0\n", "invalid config"),
        ("[unknown]\nx = 1\n", "invalid config"),
        ("object = 3\n", "invalid config"),
        ("[object\ntau = 1.0\n", "invalid config"),
        ("tau = 1.0\ntau = 2.0\n", "invalid config"),
        ("\u{0}\u{1}\u{2} binary", "invalid config"),
    ];
    for (toml, problem) in cases {
        let config = dir.join("bad.toml");
        std::fs::write(&config, toml).unwrap();
        let out = run(&fit_args(&data, &model, &config));
        assert_refused(&out, toml, &[problem, "bad.toml"]);
    }
    // Not valid UTF-8, a folder, a missing file.
    let binary = dir.join("binary.toml");
    std::fs::write(&binary, [0xFF, 0xFE, 0x00, 0x80]).unwrap();
    let odd_files = [
        (binary, "binary.toml"),
        (dir.clone(), "cannot read config"),
        (dir.join("missing.toml"), "missing.toml"),
    ];
    for (config, problem) in &odd_files {
        let out = run(&fit_args(&data, &model, config));
        assert_refused(&out, problem, &[problem]);
    }
    assert!(!model.exists());

    // Valid but unusual configs pass validation: the fit then stops at the
    // (missing) data folder, which is checked next.
    let valid = [
        "",
        "# only a comment\n",
        "seed = 9223372036854775807\n",
        "[texture]\ncoreset_ratio = 1.0\n",
        "[object]\ntau = 1e-300\n",
        "\u{feff}seed = 3\n",
    ];
    for toml in valid {
        let config = dir.join("odd.toml");
        std::fs::write(&config, toml).unwrap();
        let out = run(&fit_args(&dir.join("no-data"), &model, &config));
        assert_refused(&out, toml, &["no-data: no such folder"]);
    }
    report("configs", cases.len() + odd_files.len() + valid.len());
}

// ---------------------------------------------------------------- model files

/// Offsets of the sections of a model file: the end of the header length,
/// the end of the header, and each tensor's `(name, start, end)` in the file.
fn sections(bytes: &[u8]) -> (usize, usize, Vec<(String, usize, usize)>) {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = 8 + header_len;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..data]).unwrap();
    let mut tensors: Vec<(String, usize, usize)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = &v["data_offsets"];
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k.clone(), data + a, data + b)
        })
        .collect();
    tensors.sort_by_key(|t| t.1);
    (8, data, tensors)
}

/// The shared model re-saved after `edit` (so with a valid checksum).
fn edited_model(edit: impl FnOnce(&mut ModelFile)) -> Vec<u8> {
    let mut file = ModelFile::from_bytes(&fitted().bytes, "m").unwrap();
    edit(&mut file);
    file.to_bytes()
}

fn tensor_f64(file: &ModelFile, name: &str) -> Vec<f64> {
    file.tensors[name]
        .bytes
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn set_f64(file: &mut ModelFile, name: &str, f: impl FnOnce(&mut Vec<f64>)) {
    let shape = file.tensors[name].shape.clone();
    let mut values = tensor_f64(file, name);
    f(&mut values);
    file.tensors
        .insert(name.into(), StoredTensor::from_f64(shape, &values));
}

fn model_cases() -> Vec<(String, Vec<u8>, &'static str)> {
    const BAD: &str = "not a beltad model file or truncated";
    const CHECKSUM: &str = "checksum mismatch";
    let good = &fitted().bytes;
    let (len_end, header_end, tensors) = sections(good);
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    let mut cut = |name: String, at: usize| cases.push((name, good[..at].to_vec(), BAD));

    // Truncated at and around every section boundary.
    cut("cut_empty".into(), 0);
    cut("cut_in_length".into(), 4);
    cut("cut_after_length".into(), len_end);
    cut("cut_after_length_plus_1".into(), len_end + 1);
    cut("cut_in_header".into(), (len_end + header_end) / 2);
    cut("cut_before_header_end".into(), header_end - 1);
    cut("cut_after_header".into(), header_end);
    for (name, start, end) in &tensors {
        cut(format!("cut_at_start_of_{name}"), *start + 1);
        cut(format!("cut_in_{name}"), (start + end) / 2);
        cut(format!("cut_before_end_of_{name}"), end - 1);
    }
    let flip = |at: usize, xor: u8| {
        let mut b = good.clone();
        b[at] ^= xor;
        b
    };

    // Flipped bytes in each section.
    cases.push(("flip_length_low".into(), flip(0, 0x01), BAD));
    cases.push(("flip_length_high".into(), flip(7, 0x80), BAD));
    cases.push(("flip_header_brace".into(), flip(len_end, 0x20), BAD));
    let header = String::from_utf8_lossy(&good[len_end..header_end]).into_owned();
    let tau_at = len_end + header.find("tau = ").unwrap() + 6;
    cases.push(("flip_in_stored_config".into(), flip(tau_at, 0x01), CHECKSUM));
    let offsets_at = len_end + header.find("data_offsets\":[").unwrap() + 16;
    cases.push(("flip_in_data_offsets".into(), flip(offsets_at, 0x04), BAD));
    for (name, start, end) in &tensors {
        cases.push((
            format!("flip_in_{name}"),
            flip((start + end) / 2, 0x10),
            CHECKSUM,
        ));
    }
    cases.push((
        "flip_last_byte".into(),
        flip(good.len() - 1, 0x01),
        CHECKSUM,
    ));
    let mut appended = good.clone();
    appended.extend_from_slice(b"extra");
    cases.push(("appended_bytes".into(), appended, BAD));

    // Markers of other files and versions.
    let replace = |from: &str, to: &str| {
        let mut b = good.clone();
        let at = b
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap();
        b[at..at + from.len()].copy_from_slice(to.as_bytes());
        b
    };
    cases.push((
        "version_7".into(),
        replace("\"format_version\":\"1\"", "\"format_version\":\"7\""),
        "format version 7",
    ));
    cases.push((
        "other_format".into(),
        replace("\"beltad-model\"", "\"beltad-modem\""),
        "no beltad format marker",
    ));
    let plain = safetensors::serialize(
        [(
            "x",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0; 4])
                .unwrap(),
        )],
        None,
    )
    .unwrap();
    cases.push(("plain_safetensors".into(), plain, "no beltad format marker"));
    let png = encode(DynamicImage::new_rgb8(4, 4), ImageFormat::Png);
    cases.push(("picture".into(), png, BAD));
    cases.push((
        "text".into(),
        b"not a model at all, but long enough".to_vec(),
        BAD,
    ));

    // Valid checksum, broken content.
    for (name, _, _) in &tensors {
        let bytes = edited_model(|f| {
            f.tensors.remove(name);
        });
        cases.push((format!("missing_{name}"), bytes, "is missing"));
    }
    let d = fitted_dim(good);
    type ModelEdit<'a> = Box<dyn FnOnce(&mut ModelFile) + 'a>;
    let edits: Vec<(&str, ModelEdit, &str)> = vec![
        (
            "whitening_flat",
            Box::new(|f| f.tensors.get_mut("object.cls.whitening").unwrap().shape = vec![d * d]),
            "object.cls.whitening",
        ),
        (
            "mean_as_f32",
            Box::new(|f| {
                let v: Vec<f32> = tensor_f64(f, "object.cls.mean")
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                f.tensors.insert(
                    "object.cls.mean".into(),
                    StoredTensor::from_f32(vec![v.len()], &v),
                );
            }),
            "object.cls.mean",
        ),
        (
            "bank_as_f64",
            Box::new(|f| f.tensors.get_mut("texture.memory_bank").unwrap().dtype = DType::F64),
            BAD,
        ),
        (
            "foreground_short",
            Box::new(|f| {
                f.tensors.insert(
                    "object.foreground".into(),
                    StoredTensor::from_f32(vec![d - 1], &vec![0.0; d - 1]),
                );
            }),
            "object.foreground",
        ),
        (
            "empty_bank",
            Box::new(|f| {
                let dim = f.tensors["texture.memory_bank"].shape[1];
                f.tensors.insert(
                    "texture.memory_bank".into(),
                    StoredTensor::from_f32(vec![0, dim], &[]),
                );
            }),
            "memory bank",
        ),
        (
            "calibration_lengths_differ",
            Box::new(|f| {
                let rows = f.tensors["calibration.map_max"].shape[0];
                let values = vec![0.5; rows];
                let table = StoredTensor::from_f64(vec![rows, 1], &values);
                f.tensors.insert("calibration.map_max".into(), table);
            }),
            "calibration tables disagree",
        ),
        (
            "nan_in_whitening",
            Box::new(|f| set_f64(f, "object.cls.whitening", |v| v[0] = f64::NAN)),
            "object.cls",
        ),
        (
            "upper_triangle_set",
            Box::new(|f| set_f64(f, "attribution.mean_token.whitening", |v| v[1] = 1.0)),
            "attribution.mean_token",
        ),
        (
            "zero_on_diagonal",
            Box::new(|f| set_f64(f, "attribution.mean_token.whitening", |v| v[0] = 0.0)),
            "attribution.mean_token",
        ),
        (
            "inf_in_mean",
            Box::new(|f| set_f64(f, "attribution.mean_token.mean", |v| v[2] = f64::INFINITY)),
            "attribution.mean_token",
        ),
        (
            "config_not_toml",
            Box::new(|f| {
                f.metadata.insert("config".into(), "[[[".into());
            }),
            "stored config is invalid",
        ),
        (
            "config_absurd_tau",
            Box::new(|f| {
                let c = f.metadata["config"].replace("tau = 1.14", "tau = -1.0");
                f.metadata.insert("config".into(), c);
            }),
            "object.tau",
        ),
        (
            "config_missing",
            Box::new(|f| {
                f.metadata.remove("config");
            }),
            "metadata `config`",
        ),
        (
            "map_normal_max_not_a_number",
            Box::new(|f| {
                f.metadata.insert("map_normal_max".into(), "high".into());
            }),
            "map_normal_max",
        ),
        (
            "nan_in_fused_calibration_scores",
            Box::new(|f| set_f64(f, "calibration.fused_scores", |v| v[0] = f64::NAN)),
            "not a finite number",
        ),
        (
            "inf_in_branch_calibration_scores",
            Box::new(|f| set_f64(f, "calibration.branch_scores", |v| v[1] = f64::INFINITY)),
            "not a finite number",
        ),
        (
            "n_fit_images_negative",
            Box::new(|f| {
                f.metadata.insert("n_fit_images".into(), "-3".into());
            }),
            "n_fit_images",
        ),
        (
            "weights_not_json",
            Box::new(|f| {
                f.metadata.insert("weights".into(), "{".into());
            }),
            "weights",
        ),
    ];
    for (name, edit, needle) in edits {
        cases.push((name.to_string(), edited_model(edit), needle));
    }
    cases
}

/// Width of the object branch's CLS features in a model file.
fn fitted_dim(bytes: &[u8]) -> usize {
    let file = ModelFile::from_bytes(bytes, "m").unwrap();
    file.tensors["object.cls.mean"].shape[0]
}

#[test]
fn model_files_truncated_flipped_and_inconsistent() {
    let f = fitted();
    let dir = sub_dir("models");
    let image = real_image();
    let preds = dir.join("preds");
    let cases = model_cases();
    for (name, bytes, needle) in &cases {
        let path = dir.join(format!("{name}.beltad"));
        std::fs::write(&path, bytes).unwrap();
        let out = run(&predict_args(&path, &preds, &[&image], &[]));
        assert_refused(&out, name, &[&format!("{name}.beltad"), needle]);
    }
    assert!(
        !preds.join("scores.jsonl").exists(),
        "scores written for a failed run"
    );

    // Not a file: a folder, a missing path, a character device.
    let others = [
        (dir.clone(), "models"),
        (dir.join("missing.beltad"), "missing.beltad"),
        (PathBuf::from("/dev/zero"), "/dev/zero"),
    ];
    for (path, needle) in &others {
        let out = run(&predict_args(path, &preds, &[&image], &[]));
        assert_refused(&out, needle, &[needle]);
    }

    // Valid edits: an extra tensor and extra metadata are ignored.
    // A heatmap scale that is not a number falls back to 1.
    let valid = [
        edited_model(|m| {
            m.tensors
                .insert("zz.future".into(), StoredTensor::from_f32(vec![1], &[1.0]));
            m.metadata
                .insert("zz_note".into(), "from a newer build".into());
        }),
        edited_model(|m| {
            m.metadata.insert("map_normal_max".into(), "NaN".into());
        }),
    ];
    for (i, bytes) in valid.iter().enumerate() {
        let path = dir.join(format!("valid{i}.beltad"));
        std::fs::write(&path, bytes).unwrap();
        let out = run(&predict_args(&path, &preds, &[&image], &[]));
        assert!(out.status.success(), "{}", text(&out));
    }
    let _ = f;
    report("model files", cases.len() + others.len() + valid.len());
}

// ---------------------------------------------------------------- weights

/// A weights folder with the shipped DINOv2 (linked) and `mobilenet` as the
/// MobileNetV2 file.
fn weights_dir(dir: &Path, mobilenet: &[u8]) -> PathBuf {
    let weights = dir.join("weights");
    let _ = std::fs::remove_dir_all(&weights);
    std::fs::create_dir_all(&weights).unwrap();
    let shipped = shared().join("weights/dinov2_vits14.safetensors");
    std::os::unix::fs::symlink(shipped, weights.join("dinov2_vits14.safetensors")).unwrap();
    std::fs::write(weights.join("mobilenet_v2.safetensors"), mobilenet).unwrap();
    weights
}

/// The shipped MobileNetV2 file re-serialised after `edit` of its tensors.
fn edited_weights(
    shipped: &[u8],
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(shipped).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn weights_files_missing_truncated_and_misshapen() {
    let f = fitted();
    let dir = sub_dir("weights");
    let image = real_image();
    let shipped = std::fs::read(shared().join("weights/mobilenet_v2.safetensors")).unwrap();
    const FIRST_CONV: &str = "features.0.0.weight";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty file", Vec::new(), "mobilenet_v2.safetensors"),
        (
            "text file",
            b"weights? no".to_vec(),
            "mobilenet_v2.safetensors",
        ),
        (
            "truncated",
            shipped[..shipped.len() / 2].to_vec(),
            "mobilenet_v2.safetensors",
        ),
        (
            "header only",
            shipped[..4096].to_vec(),
            "mobilenet_v2.safetensors",
        ),
        (
            "missing tensor",
            edited_weights(&shipped, |t| t.retain(|x| x.0 != FIRST_CONV)),
            FIRST_CONV,
        ),
        (
            "misshapen tensor",
            edited_weights(&shipped, |t| {
                let x = t.iter_mut().find(|x| x.0 == FIRST_CONV).unwrap();
                x.2 = vec![x.2.iter().product()];
            }),
            FIRST_CONV,
        ),
        (
            "integer tensor",
            edited_weights(&shipped, |t| {
                let x = t.iter_mut().find(|x| x.0 == FIRST_CONV).unwrap();
                x.1 = safetensors::Dtype::I32;
            }),
            "mobilenet_v2",
        ),
        (
            "other values",
            edited_weights(&shipped, |t| {
                let x = t.iter_mut().find(|x| x.0 == FIRST_CONV).unwrap();
                x.3[0] ^= 1;
            }),
            "other mobilenet_v2 weights",
        ),
    ];
    for (what, bytes, needle) in &cases {
        let weights = weights_dir(&dir, bytes);
        let preds = dir.join("preds");
        let args = predict_args(&f.model, &preds, &[&image], &["--weights", s(&weights)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = beltad_with_weights(&args, &weights);
        assert_refused(&out, what, &[needle]);
        assert!(
            !preds.join("scores.jsonl").exists(),
            "{what}: scores written"
        );
    }

    // A folder where the file should be, and no DINOv2 file at all.
    let weights = weights_dir(&dir, &shipped);
    std::fs::remove_file(weights.join("mobilenet_v2.safetensors")).unwrap();
    std::fs::create_dir(weights.join("mobilenet_v2.safetensors")).unwrap();
    std::fs::remove_file(weights.join("dinov2_vits14.safetensors")).unwrap();
    let args = predict_args(
        &f.model,
        &dir.join("p"),
        &[&image],
        &["--weights", s(&weights)],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_clean_error(
        &beltad_with_weights(&args, &weights),
        "dinov2_vits14.safetensors",
    );
    report("weights files", cases.len() + 1);
}

// ---------------------------------------------------------------- feature cache

/// A feature cache entry's header fields and values.
struct Entry {
    head: [u32; 5],
    values: Vec<u8>,
}

/// Header: magic, then version, grid h, grid w, cls length, patches length.
const ENTRY_HEADER: usize = 24;

fn read_entry(path: &Path) -> Entry {
    let bytes = std::fs::read(path).unwrap();
    let word = |i: usize| u32::from_le_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap());
    Entry {
        head: [word(0), word(1), word(2), word(3), word(4)],
        values: bytes[ENTRY_HEADER..].to_vec(),
    }
}

fn entry_bytes(e: &Entry) -> Vec<u8> {
    let mut out = b"BTOK".to_vec();
    for w in e.head {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&e.values);
    out
}

/// Cache entries of one stream (a folder named after backbone and input size).
fn entries(cache: &Path, stream_prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for stream in file_names(cache) {
        if !stream.starts_with(stream_prefix) {
            continue;
        }
        for shard in file_names(&cache.join(&stream)) {
            let dir = cache.join(&stream).join(shard);
            found.extend(file_names(&dir).into_iter().map(|n| dir.join(n)));
        }
    }
    assert!(!found.is_empty(), "no cache entries for {stream_prefix}");
    found
}

#[test]
fn damaged_feature_cache_entries_are_recomputed() {
    let f = fitted();
    let dir = sub_dir("cache");
    let image = real_image();
    let cache = dir.join("cache");
    let scores = |name: &str, with_cache: bool| {
        let preds = dir.join(name);
        let extra: &[&str] = if with_cache {
            &["--no-images", "--cache", s(&cache)]
        } else {
            &["--no-images"]
        };
        let out = run(&predict_args(&f.model, &preds, &[&image], extra));
        assert_no_panic(&out);
        assert!(out.status.success(), "{name}: {}", text(&out));
        std::fs::read_to_string(preds.join("scores.csv")).unwrap()
    };
    let reference = scores("plain", false);
    assert_eq!(scores("filled", true), reference);

    // Object stream: DINOv2 at the object input size (112 in SMALL_CONFIG).
    let object = "dinov2_vits14";
    let texture = "mobilenet_v2";
    type Forge = Box<dyn Fn(&mut Entry)>;
    let forgeries: Vec<(&str, &str, Forge)> = vec![
        (
            "cls of width 1",
            object,
            Box::new(|e| {
                let cls = e.head[3] as usize;
                e.values.drain(4..4 * cls);
                e.head[3] = 1;
            }),
        ),
        (
            "patches of half width",
            texture,
            Box::new(|e| {
                e.values.truncate(e.values.len() / 2);
                e.head[4] /= 2;
            }),
        ),
        (
            "grid of one row",
            object,
            Box::new(|e| {
                e.head[2] *= e.head[1];
                e.head[1] = 1;
            }),
        ),
        (
            "values cut short",
            texture,
            Box::new(|e| e.values.truncate(100)),
        ),
        ("huge lengths", object, Box::new(|e| e.head[4] = u32::MAX)),
        ("zero grid", texture, Box::new(|e| e.head[1] = 0)),
        ("other entry version", object, Box::new(|e| e.head[0] = 99)),
    ];
    for (what, stream, forge) in &forgeries {
        for path in entries(&cache, stream) {
            let mut e = read_entry(&path);
            forge(&mut e);
            std::fs::write(&path, entry_bytes(&e)).unwrap();
        }
        assert_eq!(&scores("forged", true), &reference, "{what}");
    }
    let raw: [(&str, Vec<u8>); 2] = [
        ("empty entry", Vec::new()),
        ("text entry", b"BTOK?".to_vec()),
    ];
    for (what, bytes) in &raw {
        for path in entries(&cache, object) {
            std::fs::write(&path, bytes).unwrap();
        }
        assert_eq!(&scores("raw", true), &reference, "{what}");
    }
    report("feature cache entries", forgeries.len() + raw.len());
}

// ---------------------------------------------------------------- not files

#[test]
fn devices_and_pipes_are_refused_not_read() {
    let f = fitted();
    let dir = sub_dir("devices");
    let fifo = dir.join("pipe.png");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let zero = Path::new("/dev/zero");

    // As images: one unreadable row each, the real image is scored.
    let preds = dir.join("preds");
    let out = run(&predict_args(
        &f.model,
        &preds,
        &[&fifo, zero, &real_image()],
        &[],
    ));
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let rows = score_rows(&preds);
    for name in ["pipe.png", "zero"] {
        let error = rows[name]["error"].as_str().unwrap_or("");
        assert!(error.contains("not a regular file"), "{name}: {error}");
    }
    assert_eq!(rows.len(), 3);

    // As model and config files.
    for model in [&fifo, zero] {
        let out = run(&predict_args(model, &dir.join("p"), &[&real_image()], &[]));
        assert_refused(&out, s(model), &[s(model), "not a regular file"]);
    }
    for config in [&fifo, zero] {
        let out = run(&fit_args(&f.data, &dir.join("m.beltad"), config));
        assert_refused(&out, s(config), &[s(config), "not a regular file"]);
    }
    report("devices and pipes", 6);
}
