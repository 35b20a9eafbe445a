//! The evaluation report: JSON (`{"scale", "crops", "methods": {name: {"psnr", "ssim"}}}`, the
//! methods in the order they ran), a markdown table, and a contact sheet.

use image::RgbImage;
use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};

/// Mean PSNR (dB) and SSIM of one method.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Score {
    pub psnr: f64,
    pub ssim: f64,
}

/// Scores of every method at one scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub scale: u32,
    pub crops: usize,
    /// In evaluation order.
    pub methods: Vec<(String, Score)>,
}

struct Methods<'a>(&'a [(String, Score)]);

impl Serialize for Methods<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, score) in self.0 {
            map.serialize_entry(name, score)?;
        }
        map.end()
    }
}

impl Serialize for Report {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Report", 3)?;
        st.serialize_field("scale", &self.scale)?;
        st.serialize_field("crops", &self.crops)?;
        st.serialize_field("methods", &Methods(&self.methods))?;
        st.end()
    }
}

impl Report {
    /// Pretty JSON. A non-finite score (PSNR of a method that reproduced every crop exactly)
    /// has no JSON number, so it is an error naming the method rather than a silent `null`.
    pub fn to_json(&self) -> Result<String, String> {
        if let Some((name, _)) = self.methods.iter().find(|(_, s)| !s.psnr.is_finite() || !s.ssim.is_finite()) {
            return Err(format!("method `{name}`: score is not finite (identical output on every crop?)"));
        }
        serde_json::to_string_pretty(self).map_err(|e| e.to_string())
    }

    /// A markdown table, one row per method.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "Scale ×{}, {} crops of 256² px.\n\n| method | PSNR (dB) ↑ | SSIM ↑ |\n|---|---:|---:|\n",
            self.scale, self.crops
        );
        for (name, s) in &self.methods {
            out += &format!("| {name} | {:.2} | {:.4} |\n", s.psnr, s.ssim);
        }
        out
    }
}

/// Gutter between tiles, in pixels (white).
const GUTTER: u32 = 4;

/// Lays out rows of equally sized tiles on a white sheet: one row per crop, typically the
/// low-res input (nearest-upscaled), each method's output, and the ground truth.
pub fn contact_sheet(rows: &[Vec<RgbImage>]) -> Result<RgbImage, String> {
    let first = rows.first().and_then(|r| r.first()).ok_or("contact sheet: no tiles")?;
    let (tw, th) = first.dimensions();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let width = cols * tw + (cols + 1) * GUTTER;
    let height = rows.len() as u32 * th + (rows.len() as u32 + 1) * GUTTER;
    let mut sheet = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            if tile.dimensions() != (tw, th) {
                return Err(format!("contact sheet: tile {r},{c} is {:?}, expected {:?}", tile.dimensions(), (tw, th)));
            }
            let x = GUTTER + c as u32 * (tw + GUTTER);
            let y = GUTTER + r as u32 * (th + GUTTER);
            image::imageops::replace(&mut sheet, tile, x as i64, y as i64);
        }
    }
    Ok(sheet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            scale: 4,
            crops: 12,
            methods: vec![
                ("cfm".into(), Score { psnr: 25.5, ssim: 0.71 }),
                ("latent_bilinear".into(), Score { psnr: 24.0, ssim: 0.65 }),
                ("bicubic".into(), Score { psnr: 26.0, ssim: 0.73 }),
                ("ae_ceiling".into(), Score { psnr: 28.0, ssim: 0.85 }),
            ],
        }
    }

    #[test]
    fn json_has_the_exact_shape_in_method_order() {
        let json = report().to_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["scale"], 4);
        assert_eq!(v["crops"], 12);
        assert_eq!(v["methods"]["cfm"]["psnr"], 25.5);
        assert_eq!(v["methods"]["ae_ceiling"]["ssim"], 0.85);
        assert_eq!(v.as_object().unwrap().len(), 3);
        let order: Vec<usize> =
            ["\"cfm\"", "\"latent_bilinear\"", "\"bicubic\"", "\"ae_ceiling\""].iter().map(|k| json.find(k).unwrap()).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{json}");
    }

    #[test]
    fn infinite_scores_are_refused_by_name() {
        let mut r = report();
        r.methods[3].1.psnr = f64::INFINITY;
        assert!(r.to_json().unwrap_err().contains("ae_ceiling"));
    }

    #[test]
    fn markdown_lists_every_method() {
        let md = report().to_markdown();
        assert!(md.contains("| latent_bilinear | 24.00 | 0.6500 |"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| ")).count(), 5);
    }

    #[test]
    fn contact_sheet_places_tiles() {
        let red = RgbImage::from_pixel(8, 6, image::Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(8, 6, image::Rgb([0, 0, 255]));
        let sheet = contact_sheet(&[vec![red.clone(), blue.clone()], vec![blue, red]]).unwrap();
        assert_eq!(sheet.dimensions(), (2 * 8 + 3 * GUTTER, 2 * 6 + 3 * GUTTER));
        assert_eq!(sheet.get_pixel(GUTTER, GUTTER).0, [255, 0, 0]);
        assert_eq!(sheet.get_pixel(2 * GUTTER + 8, GUTTER).0, [0, 0, 255]);
        assert_eq!(sheet.get_pixel(0, 0).0, [255, 255, 255]);
        assert!(contact_sheet(&[]).is_err());
    }
}
