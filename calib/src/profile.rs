//! Preprocessing profiles: how an image file becomes a model input tensor.
//!
//! A [`Preprocess`] is applied in this order: decode, colour conversion, resize, center crop,
//! per-pixel normalisation `x = (v * scale - mean[c]) / std[c]` (with `v` the 8-bit value in
//! `0..=255` and `c` the channel in the model's order), then layout (NCHW or NHWC, without the
//! batch axis).
//!
//! A profile is either one of the built-in names in [`BUILTIN_PROFILES`] or a small TOML file:
//!
//! ```toml
//! [preprocess]
//! resize = 256              # short side to 256, or [width, height] for an exact size
//! crop = 224                # center crop 224x224, or [width, height]
//! color = "rgb"             # "rgb", "bgr" or "gray"
//! scale = 0.00392156862745098
//! mean = [0.485, 0.456, 0.406]   # one value per channel, or a single value for all
//! std = [0.229, 0.224, 0.225]
//! layout = "nchw"           # or "nhwc"
//! ```
//!
//! Missing keys take the identity values of [`Preprocess::default`]; unknown keys are an error.

use std::fmt;
use std::path::Path;

use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageBuffer, Pixel, RgbImage};
use ndarray::{ArrayD, IxDyn};
use serde::Deserialize;

use crate::error::Error;

/// The names accepted by [`Preprocess::builtin`], in the order they are listed in messages.
pub const BUILTIN_PROFILES: &[&str] = &[
    "resnet8",
    "resnet-large",
    "efficientnet",
    "vww",
    "mnist",
    "imagenet",
];

/// The most pixels an image may have after its resize (16 Mi, e.g. 4096x4096), checked before
/// resizing: a short-side resize of a very thin image (a 1x100000 PNG is 476 bytes) would
/// otherwise allocate gigabytes.
pub const MAX_RESIZED_PIXELS: u64 = 1 << 24;

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image is resized before cropping.
///
/// Resizing uses `image::imageops::resize` with the bilinear (`Triangle`) filter, which widens
/// its support when shrinking, so downscaling is antialiased (as Pillow's bilinear is). An image
/// that already has the target size is not resampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Scale so that the shorter side has this length, keeping the aspect ratio; the longer side
    /// is `floor(long * side / short)`, as torchvision's `Resize(int)` computes it.
    ShortSide(u32),
    /// Scale to exactly this width and height.
    Exact(u32, u32),
}

/// The channels an image is converted to, in the model's channel order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    /// Three channels: red, green, blue.
    Rgb,
    /// Three channels: blue, green, red.
    Bgr,
    /// One channel: luma `L = (19595 R + 38470 G + 7471 B + 32768) >> 16` for colour images
    /// (ITU-R 601-2, Pillow's `convert("L")`); grey images are taken as they are.
    Gray,
}

/// The axis order of one preprocessed image (the batch axis is added in front).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Channels, height, width.
    Nchw,
    /// Height, width, channels.
    Nhwc,
}

/// A preprocessing specification: how an image file becomes one item of a float model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Resize applied first, if any.
    pub resize: Option<Resize>,
    /// Center crop `(width, height)` applied after the resize, if any.
    pub center_crop: Option<(u32, u32)>,
    /// The channels fed to the model.
    pub color: Color,
    /// Multiplies the 8-bit pixel value `v` before the mean is subtracted.
    pub scale: f32,
    /// Subtracted per channel after scaling: one value per channel, or one value for all.
    pub mean: Vec<f32>,
    /// Divides per channel after the mean is subtracted: one value per channel, or one for all.
    pub std: Vec<f32>,
    /// The axis order of the result.
    pub layout: Layout,
}

impl Default for Preprocess {
    /// The identity: raw `0..=255` values, RGB, NCHW, no resize and no crop.
    fn default() -> Self {
        Preprocess {
            resize: None,
            center_crop: None,
            color: Color::Rgb,
            scale: 1.0,
            mean: vec![0.0],
            std: vec![1.0],
            layout: Layout::Nchw,
        }
    }
}

impl fmt::Display for Preprocess {
    /// A one-line summary, e.g. `resize short side 256, crop 224x224, rgb, (v*1 - [127.5]) / [127.5], nchw`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.resize {
            Some(Resize::ShortSide(s)) => write!(f, "resize short side {s}, ")?,
            Some(Resize::Exact(w, h)) => write!(f, "resize {w}x{h}, ")?,
            None => {}
        }
        if let Some((w, h)) = self.center_crop {
            write!(f, "crop {w}x{h}, ")?;
        }
        let color = match self.color {
            Color::Rgb => "rgb",
            Color::Bgr => "bgr",
            Color::Gray => "gray",
        };
        let layout = match self.layout {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        };
        write!(
            f,
            "{color}, (v*{} - {:?}) / {:?}, {layout}",
            self.scale, self.mean, self.std
        )
    }
}

impl Preprocess {
    /// The built-in profile of this name (see [`BUILTIN_PROFILES`]), or `None`.
    ///
    /// - `resnet8`: RGB, `(v - 128) / 128`, NCHW.
    /// - `resnet-large`: RGB, `v / 255` then ImageNet mean (0.485, 0.456, 0.406) and std
    ///   (0.229, 0.224, 0.225), NCHW.
    /// - `efficientnet`: resize short side 256, crop 224, `(v - 127.5) / 127.5`, NCHW.
    /// - `vww`: resize to 96x96, raw `0..=255` values, NCHW.
    /// - `mnist`: gray, `v / 255`, NCHW.
    /// - `imagenet`: resize short side 256, crop 224, `v / 255` then ImageNet mean and std, NCHW.
    pub fn builtin(name: &str) -> Option<Preprocess> {
        let identity = Preprocess::default();
        let p = match name {
            "resnet8" => Preprocess {
                mean: vec![128.0],
                std: vec![128.0],
                ..identity
            },
            "resnet-large" => Preprocess {
                scale: 1.0 / 255.0,
                mean: IMAGENET_MEAN.to_vec(),
                std: IMAGENET_STD.to_vec(),
                ..identity
            },
            "efficientnet" => Preprocess {
                resize: Some(Resize::ShortSide(256)),
                center_crop: Some((224, 224)),
                mean: vec![127.5],
                std: vec![127.5],
                ..identity
            },
            "vww" => Preprocess {
                resize: Some(Resize::Exact(96, 96)),
                ..identity
            },
            "mnist" => Preprocess {
                color: Color::Gray,
                scale: 1.0 / 255.0,
                ..identity
            },
            "imagenet" => Preprocess {
                resize: Some(Resize::ShortSide(256)),
                center_crop: Some((224, 224)),
                scale: 1.0 / 255.0,
                mean: IMAGENET_MEAN.to_vec(),
                std: IMAGENET_STD.to_vec(),
                ..identity
            },
            _ => return None,
        };
        Some(p)
    }

    /// A built-in profile by name, or else the TOML profile file at this path.
    ///
    /// Built-in names take precedence over files of the same name in the current folder. The
    /// error for a name that is neither lists the built-in names.
    pub fn from_name_or_path(name_or_path: &str) -> Result<Preprocess, Error> {
        if let Some(p) = Preprocess::builtin(name_or_path) {
            return Ok(p);
        }
        let path = Path::new(name_or_path);
        let looks_like_path = name_or_path.contains(['/', '\\']) || name_or_path.ends_with(".toml");
        if path.exists() || looks_like_path {
            return Preprocess::from_toml_file(path);
        }
        Err(Error::UnknownProfile {
            name: name_or_path.to_string(),
            builtins: BUILTIN_PROFILES.join(", "),
        })
    }

    /// Reads a TOML profile file (a `[preprocess]` table; see the module documentation).
    pub fn from_toml_file(path: &Path) -> Result<Preprocess, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Preprocess::from_toml_str(&text, path)
    }

    /// Parses a TOML profile; `path` names the profile in errors.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Preprocess, Error> {
        let syntax = |span: Option<std::ops::Range<usize>>, reason: String| Error::ProfileSyntax {
            path: path.to_path_buf(),
            line: span.map(|s| line_of(text, s.start)),
            reason,
        };
        let file: ProfileFile =
            toml::from_str(text).map_err(|e| syntax(e.span(), e.message().to_string()))?;
        let table = file.preprocess;
        let mut p = Preprocess::default();
        if let Some(v) = table.resize {
            p.resize = Some(match size_of(v.get_ref()) {
                Some(Size::One(s)) => Resize::ShortSide(s),
                Some(Size::Two(w, h)) => Resize::Exact(w, h),
                None => {
                    return Err(syntax(
                        Some(v.span()),
                        "`resize` must be a positive integer (short side) or [width, height]"
                            .into(),
                    ));
                }
            });
        }
        if let Some(v) = table.crop {
            p.center_crop = Some(match size_of(v.get_ref()) {
                Some(Size::One(s)) => (s, s),
                Some(Size::Two(w, h)) => (w, h),
                None => {
                    return Err(syntax(
                        Some(v.span()),
                        "`crop` must be a positive integer (square side) or [width, height]".into(),
                    ));
                }
            });
        }
        if let Some(c) = table.color {
            p.color = c;
        }
        if let Some(s) = table.scale {
            p.scale = s;
        }
        if let Some(v) = table.mean {
            p.mean = floats_of(v.get_ref()).ok_or_else(|| {
                syntax(
                    Some(v.span()),
                    "`mean` must be a number or an array of numbers".into(),
                )
            })?;
        }
        if let Some(v) = table.std {
            p.std = floats_of(v.get_ref()).ok_or_else(|| {
                syntax(
                    Some(v.span()),
                    "`std` must be a number or an array of numbers".into(),
                )
            })?;
        }
        if let Some(l) = table.layout {
            p.layout = l;
        }
        p.check(&path.display().to_string())?;
        Ok(p)
    }

    /// The number of channels the colour conversion gives: 1 for gray, 3 otherwise.
    pub fn channels(&self) -> usize {
        match self.color {
            Color::Gray => 1,
            Color::Rgb | Color::Bgr => 3,
        }
    }

    /// The item shape an image of `width` x `height` gives after preprocessing: `[C, H, W]` for
    /// NCHW, `[H, W, C]` for NHWC (the crop, else the resize, deciding `H` and `W`).
    pub fn item_shape(&self, width: u32, height: u32) -> Vec<usize> {
        let (w, h) = match (self.center_crop, self.resize) {
            (Some((w, h)), _) | (None, Some(Resize::Exact(w, h))) => (u64::from(w), u64::from(h)),
            (None, Some(Resize::ShortSide(s))) => short_side_size(width, height, s),
            (None, None) => (u64::from(width), u64::from(height)),
        };
        let (c, w, h) = (self.channels(), w as usize, h as usize);
        match self.layout {
            Layout::Nchw => vec![c, h, w],
            Layout::Nhwc => vec![h, w, c],
        }
    }

    /// Checks that the specification is usable: a finite scale, mean and std of length 1 or
    /// [`channels`](Self::channels), finite values, no zero std, no zero-sized resize or crop.
    pub fn validate(&self) -> Result<(), Error> {
        self.check("preprocessing settings")
    }

    fn check(&self, origin: &str) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidPreprocess {
            origin: origin.to_string(),
            reason,
        };
        let c = self.channels();
        if !self.scale.is_finite() {
            return Err(invalid(format!("scale {} is not finite", self.scale)));
        }
        for (what, values) in [("mean", &self.mean), ("std", &self.std)] {
            if values.len() != 1 && values.len() != c {
                return Err(invalid(format!(
                    "{what} has {} values, expected 1 or {c} (one per channel)",
                    values.len()
                )));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(invalid(format!("{what} {values:?} is not finite")));
            }
        }
        if self.std.contains(&0.0) {
            return Err(invalid(format!("std {:?} contains a zero", self.std)));
        }
        match self.resize {
            Some(Resize::ShortSide(0)) => return Err(invalid("resize to a zero side".into())),
            Some(Resize::Exact(w, h)) if w == 0 || h == 0 => {
                return Err(invalid(format!("resize to {w}x{h}")));
            }
            _ => {}
        }
        if let Some((w, h)) = self.center_crop
            && (w == 0 || h == 0)
        {
            return Err(invalid(format!("center crop {w}x{h}")));
        }
        Ok(())
    }

    /// Decodes the image file at `path` and preprocesses it into one item (no batch axis):
    /// `[C, H, W]` for NCHW, `[H, W, C]` for NHWC.
    pub fn load_image(&self, path: &Path) -> Result<ArrayD<f32>, Error> {
        self.validate()?;
        let image = decode_image(path)?;
        self.apply(&image, path)
    }

    /// Preprocesses a decoded image; `path` names it in errors. Assumes `validate` passed.
    pub(crate) fn apply(&self, image: &DynamicImage, path: &Path) -> Result<ArrayD<f32>, Error> {
        match self.color {
            Color::Gray => {
                let gray = match image {
                    DynamicImage::ImageLuma8(_)
                    | DynamicImage::ImageLuma16(_)
                    | DynamicImage::ImageLumaA8(_)
                    | DynamicImage::ImageLumaA16(_) => image.to_luma8(),
                    _ => luma_601(&image.to_rgb8()),
                };
                let gray = self.resize_and_crop(gray, path)?;
                Ok(self.normalize(gray.as_raw(), gray.width(), gray.height(), 1, false))
            }
            Color::Rgb | Color::Bgr => {
                let rgb = self.resize_and_crop(image.to_rgb8(), path)?;
                let bgr = self.color == Color::Bgr;
                Ok(self.normalize(rgb.as_raw(), rgb.width(), rgb.height(), 3, bgr))
            }
        }
    }

    fn resize_and_crop<P>(
        &self,
        image: ImageBuffer<P, Vec<u8>>,
        path: &Path,
    ) -> Result<ImageBuffer<P, Vec<u8>>, Error>
    where
        P: Pixel<Subpixel = u8> + 'static,
    {
        let (w, h) = image.dimensions();
        let target = match self.resize {
            None => None,
            Some(Resize::Exact(tw, th)) => Some((u64::from(tw), u64::from(th))),
            Some(Resize::ShortSide(s)) => Some(short_side_size(w, h, s)),
        };
        let image = match target {
            Some((tw, th)) if (tw, th) != (u64::from(w), u64::from(h)) => {
                if tw.saturating_mul(th) > MAX_RESIZED_PIXELS {
                    return Err(Error::ResizeTooLarge {
                        path: path.to_path_buf(),
                        width: w,
                        height: h,
                        resize_w: tw,
                        resize_h: th,
                        max_pixels: MAX_RESIZED_PIXELS,
                    });
                }
                // Both sides are at least 1, so each is at most MAX_RESIZED_PIXELS: no truncation.
                imageops::resize(&image, tw as u32, th as u32, FilterType::Triangle)
            }
            _ => image,
        };
        let Some((cw, ch)) = self.center_crop else {
            return Ok(image);
        };
        let (w, h) = image.dimensions();
        if cw > w || ch > h {
            return Err(Error::CropTooLarge {
                path: path.to_path_buf(),
                found_w: w,
                found_h: h,
                crop_w: cw,
                crop_h: ch,
            });
        }
        if (cw, ch) == (w, h) {
            return Ok(image);
        }
        // Offsets as torchvision's center_crop rounds them (half to even).
        let left = (f64::from(w - cw) / 2.0).round_ties_even() as u32;
        let top = (f64::from(h - ch) / 2.0).round_ties_even() as u32;
        Ok(imageops::crop_imm(&image, left, top, cw, ch).to_image())
    }

    /// Applies the pixel formula to interleaved 8-bit pixels and lays them out.
    fn normalize(&self, raw: &[u8], w: u32, h: u32, c: usize, swap_rb: bool) -> ArrayD<f32> {
        let (w, h) = (w as usize, h as usize);
        let pick = |values: &[f32], ch: usize| {
            if values.len() == 1 {
                values[0]
            } else {
                values[ch]
            }
        };
        let mean: Vec<f32> = (0..c).map(|ch| pick(&self.mean, ch)).collect();
        let std: Vec<f32> = (0..c).map(|ch| pick(&self.std, ch)).collect();
        // Output channel `ch` reads source channel `src[ch]`.
        let src: Vec<usize> = (0..c)
            .map(|ch| if swap_rb { c - 1 - ch } else { ch })
            .collect();
        let f = |v: u8, ch: usize| (f32::from(v) * self.scale - mean[ch]) / std[ch];
        let mut out = Vec::with_capacity(raw.len());
        match self.layout {
            Layout::Nchw => {
                for ch in 0..c {
                    out.extend(raw.chunks_exact(c).map(|px| f(px[src[ch]], ch)));
                }
                ArrayD::from_shape_vec(IxDyn(&[c, h, w]), out)
            }
            Layout::Nhwc => {
                for px in raw.chunks_exact(c) {
                    out.extend((0..c).map(|ch| f(px[src[ch]], ch)));
                }
                ArrayD::from_shape_vec(IxDyn(&[h, w, c]), out)
            }
        }
        .expect("an image buffer holds width * height * channels values")
    }
}

/// Decodes an image file, guessing the format from its content first and its extension second.
pub(crate) fn decode_image(path: &Path) -> Result<DynamicImage, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    image::ImageReader::open(path)
        .map_err(io)?
        .with_guessed_format()
        .map_err(io)?
        .decode()
        .map_err(|e| Error::Decode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The size torchvision's `Resize(side)` gives a `w` x `h` image (the long side can exceed
/// `u32::MAX`).
fn short_side_size(w: u32, h: u32, side: u32) -> (u64, u64) {
    let scaled = |long: u32, short: u32| {
        ((u64::from(long) * u64::from(side)) / u64::from(short.max(1))).max(1)
    };
    if w <= h {
        (u64::from(side), scaled(h, w))
    } else {
        (scaled(w, h), u64::from(side))
    }
}

/// Pillow's RGB to L conversion (ITU-R 601-2 luma, fixed point).
fn luma_601(rgb: &RgbImage) -> GrayImage {
    let data = rgb
        .as_raw()
        .chunks_exact(3)
        .map(|p| {
            let l = 19595 * u32::from(p[0]) + 38470 * u32::from(p[1]) + 7471 * u32::from(p[2]);
            ((l + 0x8000) >> 16) as u8
        })
        .collect();
    GrayImage::from_raw(rgb.width(), rgb.height(), data)
        .expect("one luma value per RGB pixel fills the same dimensions")
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

enum Size {
    One(u32),
    Two(u32, u32),
}

fn size_of(v: &toml::Value) -> Option<Size> {
    let side = |v: &toml::Value| {
        v.as_integer()
            .and_then(|i| u32::try_from(i).ok())
            .filter(|&i| i > 0)
    };
    match v {
        toml::Value::Array(a) if a.len() == 2 => Some(Size::Two(side(&a[0])?, side(&a[1])?)),
        other => Some(Size::One(side(other)?)),
    }
}

fn floats_of(v: &toml::Value) -> Option<Vec<f32>> {
    let num = |v: &toml::Value| match v {
        toml::Value::Float(f) => Some(*f as f32),
        toml::Value::Integer(i) => Some(*i as f32),
        _ => None,
    };
    match v {
        toml::Value::Array(a) => a.iter().map(num).collect(),
        other => num(other).map(|f| vec![f]),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    preprocess: ProfileTable,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileTable {
    resize: Option<toml::Spanned<toml::Value>>,
    crop: Option<toml::Spanned<toml::Value>>,
    color: Option<Color>,
    scale: Option<f32>,
    mean: Option<toml::Spanned<toml::Value>>,
    std: Option<toml::Spanned<toml::Value>>,
    layout: Option<Layout>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn write_profile(dir: &Path, text: &str) -> std::path::PathBuf {
        let path = dir.join("profile.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `image` saved as the PNG `dir/name`; its path.
    fn save_png(dir: &Path, name: &str, image: RgbImage) -> std::path::PathBuf {
        let path = dir.join(name);
        image.save(&path).unwrap();
        path
    }

    #[test]
    fn builtin_profiles_are_valid_and_named_in_errors() {
        for name in BUILTIN_PROFILES {
            let p = Preprocess::from_name_or_path(name).unwrap();
            p.validate().unwrap();
            assert_eq!(Some(p), Preprocess::builtin(name));
        }
        let err = Preprocess::from_name_or_path("resnet9").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown preprocessing profile 'resnet9': no such file, and not a built-in profile \
             (resnet8, resnet-large, efficientnet, vww, mnist, imagenet)"
        );
        let err = Preprocess::from_name_or_path("missing/profile.toml").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");

        let eff = Preprocess::builtin("efficientnet").unwrap();
        assert_eq!(eff.item_shape(500, 375), vec![3, 224, 224]);
        assert_eq!(
            Preprocess::builtin("vww").unwrap().item_shape(640, 480),
            vec![3, 96, 96]
        );
        assert_eq!(
            Preprocess::builtin("mnist").unwrap().item_shape(28, 28),
            vec![1, 28, 28]
        );
        assert_eq!(
            eff.to_string(),
            "resize short side 256, crop 224x224, rgb, (v*1 - [127.5]) / [127.5], nchw"
        );
    }

    #[test]
    fn toml_profile_with_unknown_key_names_it_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_profile(dir.path(), "[preprocess]\nresise = 256\nscale = 1\n");
        let err = Preprocess::from_name_or_path(path.to_str().unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::ProfileSyntax { line: Some(2), .. }),
            "{msg}"
        );
        assert!(
            msg.starts_with(&format!("profile {} line 2: ", path.display())),
            "{msg}"
        );
        assert!(msg.contains("unknown field `resise`"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");

        let path = write_profile(dir.path(), "[preprocess]\nscale = 1\n[extra]\n");
        let msg = Preprocess::from_toml_file(&path).unwrap_err().to_string();
        assert!(msg.contains("unknown field `extra`"), "{msg}");

        let path = write_profile(dir.path(), "[preprocess]\ncolor = \"rbg\"\n");
        let msg = Preprocess::from_toml_file(&path).unwrap_err().to_string();
        assert!(msg.contains("rbg") && msg.contains("line 2"), "{msg}");

        let path = write_profile(dir.path(), "[preprocess]\nresize = [1, 2, 3]\n");
        let msg = Preprocess::from_toml_file(&path).unwrap_err().to_string();
        assert!(
            msg.contains("`resize` must be") && msg.contains("line 2"),
            "{msg}"
        );
    }

    #[test]
    fn toml_profile_parses_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_profile(
            dir.path(),
            "# ImageNet, spelled out\n[preprocess]\nresize = 256\ncrop = 224\ncolor = \"rgb\"\n\
             scale = 0.00392156862745098\nmean = [0.485, 0.456, 0.406]\n\
             std = [0.229, 0.224, 0.225]\nlayout = \"nchw\"\n",
        );
        let p = Preprocess::from_name_or_path(path.to_str().unwrap()).unwrap();
        assert_eq!(p, Preprocess::builtin("imagenet").unwrap());

        let path = write_profile(
            dir.path(),
            "[preprocess]\nresize = [96, 64]\ncrop = [32, 16]\ncolor = \"bgr\"\nscale = 1\n\
             mean = 128\nstd = [128]\nlayout = \"nhwc\"\n",
        );
        let p = Preprocess::from_toml_file(&path).unwrap();
        assert_eq!(p.resize, Some(Resize::Exact(96, 64)));
        assert_eq!(p.center_crop, Some((32, 16)));
        assert_eq!(
            (p.color, p.layout, p.scale),
            (Color::Bgr, Layout::Nhwc, 1.0)
        );
        assert_eq!((p.mean.clone(), p.std.clone()), (vec![128.0], vec![128.0]));
        assert_eq!(p.item_shape(500, 500), vec![16, 32, 3]);

        let path = write_profile(dir.path(), "[preprocess]\n");
        assert_eq!(
            Preprocess::from_toml_file(&path).unwrap(),
            Preprocess::default()
        );

        let path = write_profile(
            dir.path(),
            "[preprocess]\ncolor = \"gray\"\nmean = [1, 2, 3]\n",
        );
        let err = Preprocess::from_toml_file(&path).unwrap_err();
        assert!(matches!(err, Error::InvalidPreprocess { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("mean has 3 values, expected 1 or 1"),
            "{err}"
        );

        let path = write_profile(dir.path(), "[preprocess]\nstd = 0\n");
        let msg = Preprocess::from_toml_file(&path).unwrap_err().to_string();
        assert!(msg.contains("contains a zero"), "{msg}");
    }

    #[test]
    fn resize_and_crop_follow_torchvision_sizes_and_offsets() {
        assert_eq!(short_side_size(64, 48, 24), (32, 24));
        assert_eq!(short_side_size(48, 64, 24), (24, 32));
        assert_eq!(short_side_size(500, 375, 256), (341, 256));
        assert_eq!(short_side_size(256, 256, 256), (256, 256));

        let dir = tempfile::tempdir().unwrap();
        let wide = RgbImage::from_fn(64, 48, |x, y| Rgb([x as u8, y as u8, 0]));
        let path = save_png(dir.path(), "wide.png", wide);
        let pre = Preprocess {
            resize: Some(Resize::ShortSide(24)),
            ..Preprocess::default()
        };
        assert_eq!(pre.load_image(&path).unwrap().shape(), &[3, 24, 32]);
        assert_eq!(pre.item_shape(64, 48), vec![3, 24, 32]);

        // A 5x4 crop of a 6x7 image starts at (round_even(0.5), round_even(1.5)) = (0, 2).
        let small = RgbImage::from_fn(6, 7, |x, y| Rgb([x as u8, y as u8, 0]));
        let path = save_png(dir.path(), "small.png", small);
        let pre = Preprocess {
            center_crop: Some((5, 4)),
            ..Preprocess::default()
        };
        let x = pre.load_image(&path).unwrap();
        assert_eq!(x.shape(), &[3, 4, 5]);
        assert_eq!((x[[0, 0, 0]], x[[1, 0, 0]]), (0.0, 2.0));

        let pre = Preprocess {
            center_crop: Some((8, 8)),
            ..Preprocess::default()
        };
        let err = pre.load_image(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "image {} is 6x7 after resizing, smaller than the 8x8 center crop",
                path.display()
            )
        );
    }

    #[test]
    fn resize_beyond_the_pixel_limit_is_an_error_not_an_allocation() {
        // Found by fuzzing (fuzz/regressions/calib_image/): a 1x100000 PNG is a few hundred
        // bytes, and a short-side resize to 256 would make it 256x25600000 (19.7 GB as RGB).
        let dir = tempfile::tempdir().unwrap();
        let thin = RgbImage::from_pixel(1, 100_000, Rgb([10, 20, 30]));
        let path = save_png(dir.path(), "thin.png", thin);
        let pre = Preprocess::builtin("efficientnet").unwrap();
        let err = pre.load_image(&path).unwrap_err();
        assert!(matches!(err, Error::ResizeTooLarge { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "image {} is 1x100000; resizing it to 256x25600000 would exceed the limit of \
                 16777216 pixels",
                path.display()
            )
        );
        // A huge exact resize is refused the same way; one under the limit is done.
        let huge = Preprocess {
            resize: Some(Resize::Exact(u32::MAX, u32::MAX)),
            ..Preprocess::default()
        };
        assert!(matches!(
            huge.load_image(&path).unwrap_err(),
            Error::ResizeTooLarge { .. }
        ));
        let under = Preprocess {
            resize: Some(Resize::ShortSide(2)),
            ..Preprocess::default()
        };
        assert_eq!(under.load_image(&path).unwrap().shape(), &[3, 200_000, 2]);
        assert_eq!(
            short_side_size(1, u32::MAX, u32::MAX),
            (
                u64::from(u32::MAX),
                u64::from(u32::MAX) * u64::from(u32::MAX)
            )
        );
    }

    #[test]
    fn gray_conversion_uses_itu_601_luma() {
        let dir = tempfile::tempdir().unwrap();
        let red_then_green = RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgb([255, 0, 0])
            } else {
                Rgb([10, 200, 30])
            }
        });
        let path = save_png(dir.path(), "rgb.png", red_then_green);
        let pre = Preprocess {
            color: Color::Gray,
            ..Preprocess::default()
        };
        let x = pre.load_image(&path).unwrap();
        assert_eq!(x.shape(), &[1, 1, 2]);
        // Pillow: L = R*299/1000 + G*587/1000 + B*114/1000, rounded: 76 and 124.
        assert_eq!(x.iter().copied().collect::<Vec<_>>(), vec![76.0, 124.0]);
    }

    #[test]
    fn per_channel_mean_and_std_apply_in_model_channel_order() {
        let dir = tempfile::tempdir().unwrap();
        let pixel = RgbImage::from_pixel(1, 1, Rgb([255, 128, 0]));
        let path = save_png(dir.path(), "px.png", pixel);
        let pre = Preprocess::builtin("resnet-large").unwrap();
        let x = pre.load_image(&path).unwrap();
        let want: Vec<f32> = [255u8, 128, 0]
            .iter()
            .zip(IMAGENET_MEAN.iter().zip(IMAGENET_STD))
            .map(|(&v, (&m, s))| (f32::from(v) * (1.0 / 255.0) - m) / s)
            .collect();
        assert_eq!(x.iter().copied().collect::<Vec<_>>(), want);
        let bgr = Preprocess {
            color: Color::Bgr,
            ..pre
        };
        let x = bgr.load_image(&path).unwrap();
        assert_eq!(x[[0, 0, 0]], (0.0 - 0.485) / 0.229);
    }
}
