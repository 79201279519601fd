//! The built-in task catalog, one module per category. Each task is a typed handler with
//! its policy; [`register_all`] adds them to a registry.

use taskmesh_shared::Config;

use crate::registry::Registry;

pub mod ai;
pub mod testkit;

/// Registers every built-in task, then applies `[tasks."…"]` overrides from config.
pub fn register_all(
    registry: &mut Registry,
    cfg: &Config,
) -> Result<(), taskmesh_shared::NameError> {
    ai::register(registry)?;
    if cfg.categories.keys().any(|c| c.as_str() == "testkit") {
        testkit::register(registry)?;
    }
    registry.apply_config(cfg);
    Ok(())
}
