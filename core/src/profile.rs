//! What the serving plane knows of a model profile: its name, the job settings it uses when
//! a client leaves them unset (`[defaults]`) and what its models can run (`[capabilities]`,
//! see [`crate::capabilities`]). The networks themselves are the engine's business; the
//! profile file they come from is the same TOML, so one file says all of it.

use std::path::Path;

use serde::Deserialize;

use crate::capabilities::Capabilities;

/// Job settings a profile fills in when the client leaves them unset (0, empty, or absent).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobDefaults {
    /// Base image size in pixels (the latent is 1/8 of it).
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub scheduler: String,
    pub guidance: f32,
    pub hops: u32,
    pub cfm_solver: String,
    pub cfm_steps: u32,
}

impl Default for JobDefaults {
    /// Stable Diffusion 1.5 with the paper's CFM settings (Euler, 40 NFE, two hops).
    fn default() -> Self {
        JobDefaults {
            width: 512,
            height: 512,
            steps: 25,
            scheduler: "ddim".into(),
            guidance: 7.5,
            hops: 2,
            cfm_solver: "euler".into(),
            cfm_steps: 40,
        }
    }
}

/// A profile the coordinator admits jobs for.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileInfo {
    pub name: String,
    pub defaults: JobDefaults,
    pub capabilities: Capabilities,
}

/// The built-in `tiny` profile's file, also embedded (with its weights) by the engine.
pub const TINY_PROFILE_TOML: &str = include_str!("../../models/weights/tiny/profile.toml");
/// The `sleep` load-test profile's file (no models: `crate::sleep` runs it).
pub const SLEEP_PROFILE_TOML: &str = include_str!("sleep.toml");

/// The part of a profile TOML the serving plane reads; other tables are the engine's.
#[derive(Deserialize)]
struct ProfileHeader {
    name: String,
    #[serde(default)]
    defaults: JobDefaults,
    capabilities: Option<Capabilities>,
}

impl ProfileInfo {
    /// Parses a profile TOML's `name`, `[defaults]` and `[capabilities]`, and checks that the
    /// defaults are jobs the capabilities allow; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| format!("{origin}: {e}"))
    }

    /// [`ProfileInfo::from_toml`] with errors that do not name the source.
    pub fn parse(text: &str) -> Result<Self, String> {
        let header: ProfileHeader = toml::from_str(text).map_err(|e| e.to_string())?;
        if header.name.trim().is_empty() {
            return Err("`name` must not be empty".into());
        }
        let capabilities = header.capabilities.ok_or(
            "no [capabilities] table: declare what the profile's models can run (text_conditioning, schedulers, hops, \
             latent_channels, latent_multiple; see docs/architecture.md, Profiles and defaults)",
        )?;
        capabilities.check(&header.defaults)?;
        Ok(ProfileInfo { name: header.name, defaults: header.defaults, capabilities })
    }

    /// `tiny` (built in), `sleep` (load tests; Stable Diffusion's defaults), or a path to a
    /// profile TOML.
    pub fn resolve(name_or_path: &str) -> Result<Self, String> {
        match name_or_path {
            "tiny" => Self::from_toml(TINY_PROFILE_TOML, "built-in profile tiny"),
            crate::sleep::PROFILE => Self::from_toml(SLEEP_PROFILE_TOML, "built-in profile sleep"),
            path if Path::new(path).is_file() => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
                Self::from_toml(&text, path)
            }
            other => Err(format!("profile `{other}`: not a built-in profile (tiny, sleep) and no such file")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_is_built_in_with_its_own_defaults() {
        let tiny = ProfileInfo::resolve("tiny").unwrap();
        assert_eq!(tiny.name, "tiny");
        assert_eq!((tiny.defaults.width, tiny.defaults.height), (64, 64));
        assert_eq!(tiny.defaults.scheduler, "euler");
        assert_eq!((tiny.capabilities.hops, tiny.capabilities.base_sizes.as_slice()), (2, &[[64, 64]][..]));
        assert!(!tiny.capabilities.text_conditioning);
        let sleep = ProfileInfo::resolve("sleep").unwrap();
        assert_eq!(sleep.defaults, JobDefaults::default());
        assert!(sleep.capabilities.text_conditioning && sleep.capabilities.base_sizes.is_empty());
    }

    const CAPABILITIES: &str = "[capabilities]\ntext_conditioning = true\nschedulers = [\"lcm\", \"ddim\"]\nhops = 2\nlatent_channels = 4\nlatent_multiple = 2\n";

    #[test]
    fn capabilities_are_required_and_must_allow_the_defaults() {
        let err = ProfileInfo::from_toml("name = \"x\"\n[defaults]\nsteps = 4\n", "p.toml").unwrap_err();
        assert!(err.contains("p.toml") && err.contains("[capabilities]"), "{err}");
        let lcm_only = CAPABILITIES.replace(", \"ddim\"", "");
        let err = ProfileInfo::from_toml(&format!("name = \"x\"\n{lcm_only}"), "p.toml").unwrap_err();
        assert!(err.contains("[defaults] scheduler \"ddim\""), "{err}");
        let ok = format!("name = \"x\"\n[defaults]\nscheduler = \"lcm\"\n{CAPABILITIES}");
        assert!(ProfileInfo::from_toml(&ok, "p.toml").is_ok());
        for (from, to, needle) in [
            ("hops = 2", "hops = 1", "[defaults] hops = 2"),
            ("latent_multiple = 2", "latent_multiple = 0", "latent_multiple"),
            ("latent_channels = 4", "latent_channels = 17", "latent_channels"),
            ("\"ddim\"]", "\"plms\"]", "plms"),
            ("latent_multiple = 2", "latent_multiple = 2\nbase_sizes = [[520, 512]]", "520x512"),
            ("latent_multiple = 2", "latent_multiple = 2\nlatent_size = 8", "latent_size"),
        ] {
            let err = ProfileInfo::from_toml(&ok.replace(from, to), "p.toml").unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        // An unconditional base must default to guidance 1 and to one of its sizes.
        let unconditional = ok.replace("text_conditioning = true", "text_conditioning = false");
        assert!(ProfileInfo::from_toml(&unconditional, "p.toml").unwrap_err().contains("guidance"));
        let sized = format!("{ok}base_sizes = [[64, 64]]\n");
        assert!(ProfileInfo::from_toml(&sized, "p.toml").unwrap_err().contains("[defaults] width, height"));
    }

    #[test]
    fn a_profile_file_gives_its_name_and_partial_defaults() {
        let dir = std::env::temp_dir().join(format!("fmboost-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sd15.toml");
        std::fs::write(&path, format!("name = \"sd15-lcm\"\n[defaults]\nsteps = 4\nscheduler = \"lcm\"\nguidance = 1.0\n[base]\nkind = \"x\"\n{CAPABILITIES}")).unwrap();
        let info = ProfileInfo::resolve(path.to_str().unwrap()).unwrap();
        assert_eq!(info.name, "sd15-lcm");
        assert_eq!((info.defaults.steps, info.defaults.scheduler.as_str(), info.defaults.width), (4, "lcm", 512));
        let err = ProfileInfo::from_toml("name = \"x\"\n[defaults]\nstepz = 4\n", "p.toml").unwrap_err();
        assert!(err.contains("stepz") && err.contains("p.toml"), "{err}");
        assert!(ProfileInfo::resolve("nope").unwrap_err().contains("nope"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
