//! What the serving plane knows of a model profile: its name and the job settings it uses
//! when a client leaves them unset. The networks themselves are the engine's business; the
//! profile file they come from is the same TOML (`[defaults]` table), so one file says both.

use std::path::Path;

use serde::Deserialize;

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
}

/// The built-in `tiny` profile's file, also embedded (with its weights) by the engine.
pub const TINY_PROFILE_TOML: &str = include_str!("../../models/weights/tiny/profile.toml");

/// The part of a profile TOML the serving plane reads; other tables are the engine's.
#[derive(Deserialize)]
struct ProfileHeader {
    name: String,
    #[serde(default)]
    defaults: JobDefaults,
}

impl ProfileInfo {
    /// Parses a profile TOML's `name` and `[defaults]`.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, String> {
        let header: ProfileHeader = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        if header.name.trim().is_empty() {
            return Err(format!("{origin}: `name` must not be empty"));
        }
        Ok(ProfileInfo { name: header.name, defaults: header.defaults })
    }

    /// `tiny` (built in), `sleep` (load tests; Stable Diffusion's defaults), or a path to a
    /// profile TOML.
    pub fn resolve(name_or_path: &str) -> Result<Self, String> {
        match name_or_path {
            "tiny" => Self::from_toml(TINY_PROFILE_TOML, "built-in profile tiny"),
            crate::sleep::PROFILE => Ok(ProfileInfo { name: crate::sleep::PROFILE.into(), defaults: JobDefaults::default() }),
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
        assert_eq!(ProfileInfo::resolve("sleep").unwrap().defaults, JobDefaults::default());
    }

    #[test]
    fn a_profile_file_gives_its_name_and_partial_defaults() {
        let dir = std::env::temp_dir().join(format!("fmboost-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sd15.toml");
        std::fs::write(&path, "name = \"sd15-lcm\"\n[defaults]\nsteps = 4\nscheduler = \"lcm\"\nguidance = 1.0\n[base]\nkind = \"x\"\n").unwrap();
        let info = ProfileInfo::resolve(path.to_str().unwrap()).unwrap();
        assert_eq!(info.name, "sd15-lcm");
        assert_eq!((info.defaults.steps, info.defaults.scheduler.as_str(), info.defaults.width), (4, "lcm", 512));
        let err = ProfileInfo::from_toml("name = \"x\"\n[defaults]\nstepz = 4\n", "p.toml").unwrap_err();
        assert!(err.contains("stepz") && err.contains("p.toml"), "{err}");
        assert!(ProfileInfo::resolve("nope").unwrap_err().contains("nope"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
