//! Registry changes and queries on a device's home shard (from the registrar, read in the
//! timer tick): add, revoke (the live session is closed with `Goodbye{revoked}` and its
//! unacknowledged agent sends answered), the listing of this shard's home devices, and one
//! device's details for `tether devices show`.

use std::collections::HashMap;
use std::time::Instant;

use tether_protocol::message::{GoodbyeReason, SendStatus};
use tether_protocol::{CodeVersion, DeviceId};

use super::route::home_shard;
use super::{Shard, now_ms, wake};
use crate::devices::{DeviceInfo, RegistryMsg, Revoked, ShardDevices};
use crate::registry::GroupId;

/// What a shard remembers of a home device whose session ended.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    pub code_version: CodeVersion,
    /// When the session ended, in Unix milliseconds.
    pub ended_ms: u64,
}

impl Shard {
    /// Applies or answers one registry message.
    pub(crate) fn on_registry(&mut self, m: RegistryMsg) {
        match m {
            RegistryMsg::Add {
                id,
                key,
                group,
                reply,
            } => {
                let r = self.registry.add(id, key, &group).map(|_| ());
                let _ = reply.send(r.map_err(|e| e.to_string()));
            }
            RegistryMsg::Revoke { id, reply } => {
                let r = self.revoke(id);
                let _ = reply.send(r);
            }
            RegistryMsg::List { reply } => {
                let _ = reply.send(self.home_devices());
            }
            RegistryMsg::Show { id, reply } => {
                let _ = reply.send(self.device_info(id));
            }
        }
    }

    /// Forgets a device. Its live session, if any, says `Goodbye{revoked}` and closes (flushed
    /// by the driver within this tick); the agent sends it did not acknowledge are answered
    /// `unknown device`. Its next connect is refused like an unknown device's.
    fn revoke(&mut self, id: DeviceId) -> Revoked {
        let mut r = Revoked::default();
        if let Some(&idx) = self.devices.get(&id) {
            r.was_online = true;
            // While the device is still registered, so its rollout state is released too.
            r.undelivered = self.unregister_with(idx, SendStatus::UnknownDevice);
            self.conns[idx].session.close(GoodbyeReason::Revoked, 0);
            wake::notify(idx);
        }
        let _ = self.registry.revoke(id);
        self.offline.remove(&id);
        r
    }

    /// Every registered device whose home this shard is, with whether it is online.
    fn home_devices(&self) -> ShardDevices {
        let mut names: HashMap<GroupId, u32> = HashMap::new();
        let mut out = ShardDevices::default();
        for (id, e) in self.registry.iter() {
            if home_shard(id, self.nshards) != self.id {
                continue;
            }
            let g = *names.entry(e.group).or_insert_with(|| {
                let name = self.registry.group_name(e.group).unwrap_or("?");
                out.groups.push(name.to_owned());
                out.groups.len() as u32 - 1
            });
            out.rows.push((id.0, g, self.devices.contains_key(&id)));
        }
        out
    }

    /// One home device in detail, if it is registered.
    fn device_info(&self, id: DeviceId) -> Option<DeviceInfo> {
        let e = self.registry.get(id)?;
        let mut info = DeviceInfo {
            id: id.0,
            group: self.registry.group_name(e.group).unwrap_or("?").to_owned(),
            online: Some(false),
            shard: Some(self.id),
            ..DeviceInfo::default()
        };
        if let Some(c) = self.devices.get(&id).and_then(|&i| self.conns.get(i)) {
            let now = now_ms();
            let heard = c.session.last_heard().map_or(now, |t| {
                now.saturating_sub(Instant::now().saturating_duration_since(t).as_millis() as u64)
            });
            info.online = Some(true);
            info.code_version = Some(c.code_version.0);
            info.last_seen_ms = Some(heard);
        } else if let Some(s) = self.offline.get(&id) {
            info.code_version = Some(s.code_version.0);
            info.last_seen_ms = Some(s.ended_ms);
        }
        Some(info)
    }
}
