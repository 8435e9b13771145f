//! The server's public client calls: what a program driving a running `tether serve` from
//! outside needs — the load generator, tests, scripts. Everything else in this crate is the
//! server's own business and may change shape without notice; these calls keep theirs.
//!
//! - the admin endpoint: [`admin_request`] (raw; [`admin_request_within`] for a slow one such as
//!   an upgrade), [`admin_json`] (typed), [`read_admin_token`]
//!   (the token from the data directory, for requests that change state);
//! - upgrades: [`request_upgrade`], what `tether upgrade` does, and its [`UpgradeReport`];
//! - the device registry as the data directory holds it: [`device_keys`], every device's id and
//!   key, for a client that simulates devices.

use std::path::Path;

use tether_protocol::DeviceId;
use tether_protocol::auth::DeviceKey;

pub use crate::admin::{
    AdminError, admin_json, admin_request, admin_request_within, read_admin_token,
};
pub use crate::registry::RegistryError;
use crate::registry::{FILE_NAME, Registry};
pub use crate::upgrade::handoff::{UpgradeReport, request_upgrade};

/// Every device in `data_dir`'s registry (`devices.csv`) with its key, sorted by id.
pub fn device_keys(data_dir: &Path) -> Result<Vec<(DeviceId, DeviceKey)>, RegistryError> {
    let registry = Registry::load(&data_dir.join(FILE_NAME))?;
    let mut out: Vec<_> = registry.iter().map(|(id, e)| (id, e.key.clone())).collect();
    out.sort_by_key(|(id, _)| id.0);
    Ok(out)
}
