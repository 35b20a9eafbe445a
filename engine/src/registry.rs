//! Finding a profile by name or path, and building a worker's executor for it.

use std::path::Path;
use std::sync::Arc;

use fmboost_core::sleep::SleepExecutor;
use fmboost_core::stage::{StageExecutor, StageKind};
use fmboost_core::worker::WorkerFlags;
use fmboost_models::device::parse_device;

use crate::executor::ModelExecutor;
use crate::files::Files;
use crate::profile::{ProfileError, ProfileSpec};
use crate::stack::{Needs, ProfileModels};

/// The name of the embedded default profile.
pub const TINY: &str = "tiny";

/// Resolves `tiny` (embedded) or a path to a profile TOML.
pub fn resolve_profile(name_or_path: &str) -> Result<(ProfileSpec, Files), ProfileError> {
    if name_or_path == TINY {
        let files = Files::tiny();
        let origin = Path::new("profile.toml");
        let text = files.read_to_string(origin).map_err(|e| ProfileError::Invalid {
            path: "<built-in tiny>/profile.toml".into(),
            message: format!("{e} (this binary was built without models/weights/tiny)"),
        })?;
        return Ok((ProfileSpec::parse(&text, Path::new("<built-in tiny>/profile.toml"))?, files));
    }
    let path = Path::new(name_or_path);
    if path.is_file() {
        return Ok((ProfileSpec::read(path)?, Files::Disk));
    }
    Err(ProfileError::Unknown(name_or_path.to_string()))
}

/// What each stage's worker loads.
pub fn needs(kind: StageKind) -> Needs {
    match kind {
        // The diffusion stage also encodes uploaded images.
        StageKind::Diffusion => Needs { base: true, autoencoder: true, hops: false },
        StageKind::Cfm => Needs { base: false, autoencoder: false, hops: true },
        StageKind::Decoder => Needs { base: false, autoencoder: true, hops: false },
    }
}

/// The worker binaries' executor factory: `sleep[:MS]` (load tests), `tiny`, or a profile file.
pub fn executor_factory(kind: StageKind, flags: &WorkerFlags) -> anyhow::Result<Box<dyn StageExecutor>> {
    if let Some(step) = SleepExecutor::parse_profile(&flags.profile) {
        if flags.device != "cpu" {
            anyhow::bail!("--device {}: the sleep profile runs on cpu only", flags.device);
        }
        return Ok(Box::new(SleepExecutor::new(kind, step?)));
    }
    let device = parse_device(&flags.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let (spec, files) = resolve_profile(&flags.profile).map_err(|e| anyhow::anyhow!("--profile: {e}"))?;
    let models = ProfileModels::load(spec, files, needs(kind), &device).map_err(|e| anyhow::anyhow!("--profile {}: {e}", flags.profile))?;
    Ok(Box::new(ModelExecutor::new(kind, Arc::new(models)).stacked(flags.stack_batches)))
}
