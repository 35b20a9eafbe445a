//! Pixels in and out: candle image tensors ↔ 8-bit RGB, and PNG files that carry their
//! generation parameters in a `parameters` tEXt chunk, as A1111 writes them, so an image
//! tells how it was made.

use candle_core::{Device, Tensor};
use fmboost_models::pixels;
use image::RgbImage;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// How an image was made; written into the PNG as A1111's `parameters` text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: u32,
    pub scheduler: String,
    pub guidance: f32,
    pub width: u32,
    pub height: u32,
    pub cfm_hops: u32,
    pub cfm_solver: String,
    pub cfm_steps: u32,
    pub profile: String,
    /// Set when the job started from an uploaded latent or image instead of a prompt.
    pub source: Option<String>,
}

impl GenerationParameters {
    /// A1111's layout: prompt line, `Negative prompt:` line, then `Key: value` pairs.
    pub fn to_a1111_text(&self) -> String {
        let mut text = String::new();
        if let Some(source) = &self.source {
            text.push_str(&format!("Source: {source}\n"));
        } else {
            text.push_str(&self.prompt);
            text.push('\n');
            if !self.negative_prompt.is_empty() {
                text.push_str(&format!("Negative prompt: {}\n", self.negative_prompt));
            }
        }
        text.push_str(&format!(
            "Steps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, CFM hops: {}, CFM solver: {}, CFM steps: {}, Profile: {}",
            self.steps,
            self.scheduler,
            self.guidance,
            self.seed,
            self.width,
            self.height,
            self.cfm_hops,
            self.cfm_solver,
            self.cfm_steps,
            self.profile
        ));
        text
    }
}

/// Converts a `[3, H, W]` tensor in [−1, 1] to 8-bit RGB (round half away from zero, clamped;
/// [`fmboost_models::pixels::from_tensor`] does the arithmetic).
pub fn tensor_to_rgb8(image: &Tensor) -> candle_core::Result<Rgb8> {
    let mut images = pixels::from_tensor(&image.unsqueeze(0)?)?;
    let rgb = images.pop().expect("from_tensor gives one image per batch entry");
    Ok(Rgb8 { width: rgb.width(), height: rgb.height(), data: rgb.into_raw() })
}

/// Converts 8-bit RGB to a `[3, H, W]` f32 tensor in [−1, 1]
/// ([`fmboost_models::pixels::to_tensor`] does the arithmetic).
pub fn rgb8_to_tensor(image: &Rgb8, device: &Device) -> candle_core::Result<Tensor> {
    let rgb = RgbImage::from_raw(image.width, image.height, image.data.clone())
        .ok_or_else(|| candle_core::Error::Msg(format!("{}x{} RGB image with {} bytes", image.width, image.height, image.data.len())))?;
    pixels::to_tensor(&[&rgb], device)?.squeeze(0)
}

/// Pads `image` on the right and bottom to multiples of `multiple` by repeating the last
/// column and row (no new content at the border for the encoder to invent around).
pub fn pad_to_multiple(image: &Rgb8, multiple: u32) -> Rgb8 {
    let width = image.width.div_ceil(multiple) * multiple;
    let height = image.height.div_ceil(multiple) * multiple;
    if (width, height) == (image.width, image.height) {
        return image.clone();
    }
    let mut data = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        let sy = y.min(image.height - 1);
        for x in 0..width {
            let sx = x.min(image.width - 1);
            let at = ((sy * image.width + sx) * 3) as usize;
            data.extend_from_slice(&image.data[at..at + 3]);
        }
    }
    Rgb8 { width, height, data }
}

/// The top-left `width`×`height` of `image` (which must be at least that large).
pub fn crop_rgb8(image: &Rgb8, width: u32, height: u32) -> Rgb8 {
    assert!(width <= image.width && height <= image.height, "crop {width}x{height} of {}x{}", image.width, image.height);
    let mut data = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        let at = (y * image.width * 3) as usize;
        data.extend_from_slice(&image.data[at..at + (width * 3) as usize]);
    }
    Rgb8 { width, height, data }
}

/// Encodes `image` as PNG with the parameters in a `parameters` tEXt chunk. Deterministic:
/// the same pixels and parameters give the same bytes.
pub fn encode_png(image: &Rgb8, parameters: &GenerationParameters) -> Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, image.width, image.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.add_text_chunk("parameters".to_string(), parameters.to_a1111_text())?;
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&image.data)?;
        writer.finish()?;
    }
    Ok(bytes)
}

/// Reads the `parameters` text of a PNG written by [`encode_png`] (or A1111).
pub fn read_png_parameters(bytes: &[u8]) -> Result<Option<String>, png::DecodingError> {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    Ok(reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|chunk| chunk.keyword == "parameters")
        .map(|chunk| chunk.text.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn params() -> GenerationParameters {
        GenerationParameters {
            prompt: "a lighthouse at dusk".into(),
            negative_prompt: "blurry".into(),
            seed: 7,
            steps: 4,
            scheduler: "lcm".into(),
            guidance: 1.0,
            width: 512,
            height: 512,
            cfm_hops: 2,
            cfm_solver: "euler".into(),
            cfm_steps: 40,
            profile: "sd15".into(),
            source: None,
        }
    }

    #[test]
    fn a1111_text_has_every_parameter() {
        let text = params().to_a1111_text();
        assert_eq!(
            text,
            "a lighthouse at dusk\nNegative prompt: blurry\nSteps: 4, Sampler: lcm, CFG scale: 1, Seed: 7, Size: 512x512, CFM hops: 2, CFM solver: euler, CFM steps: 40, Profile: sd15"
        );
    }

    #[test]
    fn png_round_trips_pixels_and_parameters_deterministically() {
        let image = Rgb8 { width: 3, height: 2, data: (0..18).map(|v| v * 13).collect() };
        let a = encode_png(&image, &params()).unwrap();
        let b = encode_png(&image, &params()).unwrap();
        assert_eq!(a, b);
        assert_eq!(read_png_parameters(&a).unwrap().unwrap(), params().to_a1111_text());
        let mut reader = png::Decoder::new(std::io::Cursor::new(&a)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..info.buffer_size()], &image.data[..]);
    }

    #[test]
    fn padding_repeats_the_border_and_crop_undoes_it() {
        let image = Rgb8 { width: 3, height: 2, data: (0..18).collect() };
        let padded = pad_to_multiple(&image, 4);
        assert_eq!((padded.width, padded.height), (4, 4));
        // Row 0: pixels 0,1,2 then pixel 2 again; rows 2 and 3 repeat row 1.
        assert_eq!(&padded.data[..12], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8]);
        assert_eq!(&padded.data[24..36], &padded.data[12..24]);
        assert_eq!(crop_rgb8(&padded, 3, 2), image);
        assert_eq!(pad_to_multiple(&image, 1), image);
    }

    #[test]
    fn tensor_conversion_maps_range_and_layout() {
        let t = Tensor::from_vec(vec![-1f32, 0.0, 1.0, 2.0, -3.0, 0.5], (3, 1, 2), &Device::Cpu).unwrap();
        let rgb = tensor_to_rgb8(&t).unwrap();
        // pixel (0,0) = channels (-1, 1, -3) ; pixel (0,1) = (0, 2, 0.5)
        assert_eq!(rgb.data, vec![0, 255, 0, 128, 255, 191]);
        let back = rgb8_to_tensor(&rgb, &Device::Cpu).unwrap();
        assert_eq!(back.dims(), &[3, 1, 2]);
        assert!(tensor_to_rgb8(&Tensor::zeros((1, 2, 2), DType::F32, &Device::Cpu).unwrap()).is_err());
    }
}
