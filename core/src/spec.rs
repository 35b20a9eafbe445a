//! The job spec: validation of what clients submit, and the stage plan of an admitted job.
//!
//! `validate` turns a `fmboost.v1.JobSpec` into a checked [`JobSpec`] plus its uploaded payload,
//! with errors that name the offending field. The admitted spec travels without the payload
//! (`to_proto`/`from_admitted`): the payload goes to Redis as the first stage's input blob.

use fmboost_proto::v1 as pb;

use crate::profile::{JobDefaults, ProfileInfo};
use crate::stage::{StageKind, StageRef};
use crate::tensor::{DType, TensorError, WireTensor};

/// Base-model schedulers the engine implements: DDIM, Euler ancestral and LCM for Stable
/// Diffusion bases; `euler` (the flow ODE) for flow-matching bases such as `tiny`'s.
pub const SCHEDULERS: &[&str] = &["ddim", "euler_a", "lcm", "euler"];
/// Fixed-step ODE solvers for the CFM hops (torchdiffeq's names; `rk4` is the 3/8 rule).
pub const SOLVERS: &[&str] = &["euler", "midpoint", "heun2", "rk4"];

/// Bounds on what a job may ask for. Sizes in pixels are of the decoded image.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The profiles jobs may name, with the defaults each fills in.
    pub profiles: Vec<ProfileInfo>,
    pub max_base_side: u32,
    pub max_output_side: u64,
    pub max_steps: u32,
    pub max_hops: u32,
    pub max_prompt_chars: usize,
    pub max_upload_bytes: usize,
    pub max_guidance: f32,
}

impl Limits {
    pub fn new(profiles: Vec<ProfileInfo>, max_upload_bytes: usize) -> Self {
        Limits {
            profiles,
            max_base_side: 2048,
            max_output_side: 8192,
            max_steps: 1000,
            max_hops: 4,
            max_prompt_chars: 4000,
            max_upload_bytes,
            max_guidance: 50.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field's path in `JobSpec`, e.g. `base.steps`.
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> ValidationError {
    ValidationError { field: field.to_string(), message: message.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Low,
    Normal,
    High,
}

impl Priority {
    /// Highest first: the order workers read their queues in.
    pub const BY_URGENCY: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    fn to_proto(self) -> pb::Priority {
        match self {
            Priority::Low => pb::Priority::Low,
            Priority::Normal => pb::Priority::Normal,
            Priority::High => pb::Priority::High,
        }
    }
}

/// Where a job starts. Uploaded payloads are not kept here (see [`Upload`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Text { prompt: String, negative_prompt: String },
    /// An uploaded latent of this shape (`[1, C, H, W]`) and dtype.
    Latent { dtype: DType, shape: Vec<usize> },
    /// An uploaded image of this size in pixels.
    Image { width: u32, height: u32 },
}

/// An uploaded payload, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Upload {
    Latent(WireTensor),
    Image(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BaseSettings {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub scheduler: String,
    pub guidance: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CfmSettings {
    pub hops: u32,
    /// Empty when `hops` is 0.
    pub solver: String,
    pub steps: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeSettings {
    /// Tile side in latent pixels; 0 decodes in one piece.
    pub tile: u32,
    pub overlap: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub source: Source,
    pub seed: u64,
    /// Present exactly for a text source.
    pub base: Option<BaseSettings>,
    pub cfm: CfmSettings,
    pub decode: DecodeSettings,
    pub profile: String,
    pub priority: Priority,
    pub deadline_unix_ms: Option<u64>,
    pub idempotency_key: Option<String>,
}

/// Checks a submitted spec against `limits` and its profile's capabilities at time `now_unix_ms`.
pub fn validate(spec: pb::JobSpec, limits: &Limits, now_unix_ms: u64) -> Result<(JobSpec, Option<Upload>), ValidationError> {
    let (job, upload) = parse(spec, Some(limits))?;
    let profile = limits.profiles.iter().find(|p| p.name == job.profile).expect("parse checked the profile is served");
    profile.capabilities.admit(&profile.name, &job)?;
    if let Some(deadline) = job.deadline_unix_ms {
        if deadline <= now_unix_ms {
            return Err(invalid("deadline_unix_ms", format!("{deadline} is in the past (now {now_unix_ms})")));
        }
    }
    Ok((job, upload))
}

impl JobSpec {
    /// Parses a spec the coordinator admitted (payload stripped by [`JobSpec::to_proto`]).
    pub fn from_admitted(spec: pb::JobSpec) -> Result<JobSpec, ValidationError> {
        parse(spec, None).map(|(job, _)| job)
    }

    /// The admitted spec in its wire form, without the uploaded payload.
    pub fn to_proto(&self) -> pb::JobSpec {
        let source = match &self.source {
            Source::Text { prompt, negative_prompt } => {
                pb::job_spec::Source::Text(pb::TextSource { prompt: prompt.clone(), negative_prompt: negative_prompt.clone() })
            }
            Source::Latent { dtype, shape } => {
                let header = WireTensor { dtype: *dtype, shape: shape.clone(), data: Vec::new() };
                pb::job_spec::Source::Latent(pb::Tensor { data: Vec::new(), crc32c: 0, ..header.to_proto() })
            }
            Source::Image { width, height } => {
                // The admitted form keeps the size in a tiny header: "WxH".
                pb::job_spec::Source::Image(pb::ImageSource { data: format!("{width}x{height}").into_bytes() })
            }
        };
        pb::JobSpec {
            source: Some(source),
            seed: self.seed,
            base: self.base.as_ref().map(|b| pb::BaseSettings {
                width: Some(b.width),
                height: Some(b.height),
                steps: Some(b.steps),
                scheduler: Some(b.scheduler.clone()),
                guidance: Some(b.guidance),
            }),
            cfm: Some(match self.cfm.hops {
                0 => pb::CfmSettings { hops: Some(0), solver: None, steps: None },
                hops => pb::CfmSettings { hops: Some(hops), solver: Some(self.cfm.solver.clone()), steps: Some(self.cfm.steps) },
            }),
            decode: Some(pb::DecodeSettings { tile: self.decode.tile, overlap: self.decode.overlap }),
            profile: self.profile.clone(),
            priority: self.priority.to_proto() as i32,
            deadline_unix_ms: self.deadline_unix_ms.unwrap_or(0),
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
        }
    }

    /// Latent (H, W) the base stage produces (text or image source), or the uploaded latent's.
    pub fn base_latent_size(&self) -> (usize, usize) {
        match (&self.source, &self.base) {
            (Source::Latent { shape, .. }, _) => (shape[2], shape[3]),
            (Source::Image { width, height }, _) => (*height as usize / 8, *width as usize / 8),
            (Source::Text { .. }, Some(base)) => (base.height as usize / 8, base.width as usize / 8),
            (Source::Text { .. }, None) => unreachable!("a text source always has base settings (checked in parse)"),
        }
    }

    /// Latent (H, W) after `hop` CFM hops.
    pub fn latent_size_after(&self, hop: u32) -> (usize, usize) {
        let (h, w) = self.base_latent_size();
        (h << hop, w << hop)
    }

    /// Decoded image size in pixels (width, height).
    pub fn output_size(&self) -> (u64, u64) {
        let (h, w) = self.latent_size_after(self.cfm.hops);
        (w as u64 * 8, h as u64 * 8)
    }

    /// The first stage of the job: diffusion for text and image sources, else the first CFM hop
    /// (or straight to the decoder with no hops).
    pub fn first_stage(&self) -> StageRef {
        match self.source {
            Source::Text { .. } | Source::Image { .. } => StageRef { kind: StageKind::Diffusion, hop: 0 },
            Source::Latent { .. } => self.after_base(),
        }
    }

    /// The stage after `current`, or None when `current` is the decoder (the last).
    pub fn next_stage(&self, current: StageRef) -> Option<StageRef> {
        match current.kind {
            StageKind::Diffusion => Some(self.after_base()),
            StageKind::Cfm if current.hop < self.cfm.hops => Some(StageRef { kind: StageKind::Cfm, hop: current.hop + 1 }),
            StageKind::Cfm => Some(StageRef { kind: StageKind::Decoder, hop: 0 }),
            StageKind::Decoder => None,
        }
    }

    fn after_base(&self) -> StageRef {
        if self.cfm.hops > 0 {
            StageRef { kind: StageKind::Cfm, hop: 1 }
        } else {
            StageRef { kind: StageKind::Decoder, hop: 0 }
        }
    }
}

/// Parses a spec. With `limits`, it is a client's submission: payload required and every bound
/// checked. Without, it is an admitted spec (payload stripped) that was checked on admission.
fn parse(spec: pb::JobSpec, limits: Option<&Limits>) -> Result<(JobSpec, Option<Upload>), ValidationError> {
    let priority = match pb::Priority::try_from(spec.priority) {
        Ok(pb::Priority::Unspecified | pb::Priority::Normal) => Priority::Normal,
        Ok(pb::Priority::Low) => Priority::Low,
        Ok(pb::Priority::High) => Priority::High,
        Err(_) => return Err(invalid("priority", format!("unknown priority {}", spec.priority))),
    };
    if spec.profile.is_empty() {
        return Err(invalid("profile", "required"));
    }
    let mut defaults = None;
    if let Some(limits) = limits {
        let Some(profile) = limits.profiles.iter().find(|p| p.name == spec.profile) else {
            let served: Vec<&str> = limits.profiles.iter().map(|p| p.name.as_str()).collect();
            return Err(invalid("profile", format!("unknown profile {:?} (served: {})", spec.profile, served.join(", "))));
        };
        defaults = Some(&profile.defaults);
        if spec.idempotency_key.len() > 200 {
            return Err(invalid("idempotency_key", "longer than 200 bytes"));
        }
    }
    let (source, upload) = parse_source(spec.source, limits)?;
    let base = match (&source, spec.base) {
        (Source::Text { .. }, Some(base)) => Some(parse_base(base, limits, defaults)?),
        (Source::Text { .. }, None) => Some(parse_base(pb::BaseSettings::default(), limits, defaults)?),
        (_, Some(_)) => return Err(invalid("base", "only valid with a text source")),
        (_, None) => None,
    };
    let cfm = parse_cfm(spec.cfm, limits, defaults)?;
    let job = JobSpec {
        source,
        seed: spec.seed,
        base,
        cfm,
        decode: DecodeSettings { tile: 0, overlap: 0 },
        profile: spec.profile,
        priority,
        deadline_unix_ms: (spec.deadline_unix_ms != 0).then_some(spec.deadline_unix_ms),
        idempotency_key: (!spec.idempotency_key.is_empty()).then_some(spec.idempotency_key),
    };
    let decode = parse_decode(spec.decode.unwrap_or_default(), &job)?;
    let job = JobSpec { decode, ..job };
    if let Some(limits) = limits {
        let (width, height) = job.output_size();
        if width.max(height) > limits.max_output_side {
            return Err(invalid(
                "cfm.hops",
                format!("output of {width}x{height} px exceeds the limit of {} px a side", limits.max_output_side),
            ));
        }
    }
    Ok((job, upload))
}

fn parse_source(source: Option<pb::job_spec::Source>, limits: Option<&Limits>) -> Result<(Source, Option<Upload>), ValidationError> {
    use pb::job_spec::Source as S;
    match source {
        None => Err(invalid("source", "required: text, latent or image")),
        Some(S::Text(text)) => {
            if let Some(limits) = limits {
                for (field, value) in [("source.text.prompt", &text.prompt), ("source.text.negative_prompt", &text.negative_prompt)] {
                    let chars = value.chars().count();
                    if chars > limits.max_prompt_chars {
                        return Err(invalid(field, format!("{chars} characters, the limit is {}", limits.max_prompt_chars)));
                    }
                }
            }
            Ok((Source::Text { prompt: text.prompt, negative_prompt: text.negative_prompt }, None))
        }
        Some(S::Latent(tensor)) => parse_latent(tensor, limits),
        Some(S::Image(image)) => parse_image(image.data, limits),
    }
}

fn parse_latent(tensor: pb::Tensor, limits: Option<&Limits>) -> Result<(Source, Option<Upload>), ValidationError> {
    const FIELD: &str = "source.latent";
    let mut shape: Vec<u64> = tensor.shape.clone();
    if shape.len() == 3 {
        shape.insert(0, 1);
    }
    if shape.len() != 4 || shape[0] != 1 {
        return Err(invalid(FIELD, format!("shape must be [C, H, W] or [1, C, H, W], got {:?}", tensor.shape)));
    }
    if !(1..=16).contains(&shape[1]) || shape[2] == 0 || shape[3] == 0 || shape[2].max(shape[3]) > 1024 {
        return Err(invalid(FIELD, format!("shape {:?}: need 1..=16 channels and 1..=1024 latent pixels a side", tensor.shape)));
    }
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let Some(limits) = limits else {
        let dtype = DType::from_proto(tensor.dtype).ok_or_else(|| invalid(FIELD, format!("unknown dtype {}", tensor.dtype)))?;
        return Ok((Source::Latent { dtype, shape }, None));
    };
    if tensor.data.len() > limits.max_upload_bytes {
        return Err(invalid(FIELD, format!("upload of {} bytes exceeds the limit of {} bytes", tensor.data.len(), limits.max_upload_bytes)));
    }
    let mut checked = WireTensor::from_proto(tensor).map_err(|e: TensorError| invalid(FIELD, e.to_string()))?;
    if checked.dtype == DType::U8 {
        return Err(invalid(FIELD, "dtype must be f32, f16 or bf16"));
    }
    checked.shape = shape.clone();
    Ok((Source::Latent { dtype: checked.dtype, shape }, Some(Upload::Latent(checked))))
}

fn parse_image(data: Vec<u8>, limits: Option<&Limits>) -> Result<(Source, Option<Upload>), ValidationError> {
    const FIELD: &str = "source.image.data";
    let Some(limits) = limits else {
        let header = String::from_utf8_lossy(&data);
        let size = header.split_once('x').and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
        let (width, height) = size.ok_or_else(|| invalid(FIELD, format!("admitted image header {header:?} is not WxH")))?;
        return Ok((Source::Image { width, height }, None));
    };
    if data.len() > limits.max_upload_bytes {
        return Err(invalid(FIELD, format!("upload of {} bytes exceeds the limit of {} bytes", data.len(), limits.max_upload_bytes)));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(&data))
        .with_guessed_format()
        .map_err(|e| invalid(FIELD, format!("unreadable image: {e}")))?;
    if reader.format().is_none() {
        return Err(invalid(FIELD, "not a PNG or JPEG image"));
    }
    let (width, height) = reader.into_dimensions().map_err(|e| invalid(FIELD, format!("undecodable image: {e}")))?;
    check_side("source.image", "width", width, limits.max_base_side)?;
    check_side("source.image", "height", height, limits.max_base_side)?;
    Ok((Source::Image { width, height }, Some(Upload::Image(data))))
}

fn check_side(parent: &str, name: &str, value: u32, max: u32) -> Result<(), ValidationError> {
    let field = format!("{parent}.{name}");
    if value == 0 || !value.is_multiple_of(8) {
        return Err(invalid(&field, format!("must be a positive multiple of 8, got {value}")));
    }
    if value > max {
        return Err(invalid(&field, format!("{value} exceeds the limit of {max}")));
    }
    Ok(())
}

fn check_steps(field: &str, steps: u32, max: u32) -> Result<(), ValidationError> {
    if steps == 0 || steps > max {
        return Err(invalid(field, format!("must be in 1..={max}, got {steps}")));
    }
    Ok(())
}

fn parse_base(base: pb::BaseSettings, limits: Option<&Limits>, defaults: Option<&JobDefaults>) -> Result<BaseSettings, ValidationError> {
    let pick = |field: &str, value: Option<u32>, default: Option<u32>| value.or(default).ok_or_else(|| invalid(field, "required"));
    let width = pick("base.width", base.width, defaults.map(|d| d.width))?;
    let height = pick("base.height", base.height, defaults.map(|d| d.height))?;
    let steps = pick("base.steps", base.steps, defaults.map(|d| d.steps))?;
    let scheduler =
        base.scheduler.or_else(|| defaults.map(|d| d.scheduler.clone())).ok_or_else(|| invalid("base.scheduler", "required"))?;
    let guidance = base.guidance.or(defaults.map(|d| d.guidance)).ok_or_else(|| invalid("base.guidance", "required"))?;
    if let Some(limits) = limits {
        check_side("base", "width", width, limits.max_base_side)?;
        check_side("base", "height", height, limits.max_base_side)?;
        check_steps("base.steps", steps, limits.max_steps)?;
        if !guidance.is_finite() || guidance < 0.0 || guidance > limits.max_guidance {
            return Err(invalid("base.guidance", format!("must be in 0..={}, got {}", limits.max_guidance, guidance)));
        }
    }
    if !SCHEDULERS.contains(&scheduler.as_str()) {
        return Err(invalid("base.scheduler", format!("unknown scheduler {:?} (known: {})", scheduler, SCHEDULERS.join(", "))));
    }
    // −0 equals 0 (IEEE 754) and guides the same: admitted as +0, so the record, the PNG's
    // parameters and idempotency comparisons see one zero.
    let guidance = if guidance == 0.0 { 0.0 } else { guidance };
    Ok(BaseSettings { width, height, steps, scheduler, guidance })
}

fn parse_cfm(cfm: Option<pb::CfmSettings>, limits: Option<&Limits>, defaults: Option<&JobDefaults>) -> Result<CfmSettings, ValidationError> {
    let cfm = cfm.unwrap_or_default();
    let hops = cfm.hops.or(defaults.map(|d| d.hops)).ok_or_else(|| invalid("cfm.hops", "required"))?;
    if hops == 0 {
        if cfm.steps.is_some() || cfm.solver.is_some() {
            return Err(invalid("cfm", "solver and steps must be unset when hops is 0"));
        }
        return Ok(CfmSettings { hops: 0, solver: String::new(), steps: 0 });
    }
    let solver = cfm.solver.or_else(|| defaults.map(|d| d.cfm_solver.clone())).ok_or_else(|| invalid("cfm.solver", "required"))?;
    let steps = cfm.steps.or(defaults.map(|d| d.cfm_steps)).ok_or_else(|| invalid("cfm.steps", "required"))?;
    if let Some(limits) = limits {
        if hops > limits.max_hops {
            return Err(invalid("cfm.hops", format!("must be in 0..={}, got {}", limits.max_hops, hops)));
        }
        check_steps("cfm.steps", steps, limits.max_steps)?;
    }
    if !SOLVERS.contains(&solver.as_str()) {
        return Err(invalid("cfm.solver", format!("unknown solver {:?} (known: {})", solver, SOLVERS.join(", "))));
    }
    Ok(CfmSettings { hops, solver, steps })
}

fn parse_decode(decode: pb::DecodeSettings, job: &JobSpec) -> Result<DecodeSettings, ValidationError> {
    if decode.tile == 0 {
        if decode.overlap != 0 {
            return Err(invalid("decode.overlap", "must be 0 without tiling (decode.tile = 0)"));
        }
    } else {
        let (h, w) = job.latent_size_after(job.cfm.hops);
        if decode.tile < 8 || decode.tile as usize > h.max(w) {
            return Err(invalid("decode.tile", format!("must be 0 or in 8..={} latent pixels, got {}", h.max(w), decode.tile)));
        }
        if decode.overlap >= decode.tile / 2 {
            return Err(invalid("decode.overlap", format!("must be less than half the tile ({}), got {}", decode.tile / 2, decode.overlap)));
        }
    }
    Ok(DecodeSettings { tile: decode.tile, overlap: decode.overlap })
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
