//! Publishing: an immutable snapshot through the watch channel, then a repaint request.
//! Only hosts that changed are cloned; the rest are shared with the previous snapshot.

use std::sync::Arc;

use dunes_shared::model::ServiceName;

use super::{
    HostView, Published, ServiceStatus, ServiceView, Snapshot,
    actor::Actor,
    notify::{Notice, Urgency},
    records::Level,
};

impl Actor {
    /// Hands a service's new status to the desktop notifier, never waiting for it.
    fn notify(&self, view: &ServiceView) {
        let Some(notices) = &self.notices else {
            return;
        };
        let ready = view.instances.iter().filter(|i| i.ready).count();
        let urgency = match view.status {
            ServiceStatus::Down | ServiceStatus::Unreadable => Urgency::Critical,
            ServiceStatus::Degraded => Urgency::Normal,
            _ => Urgency::Low,
        };
        let notice = Notice {
            service: view.name().to_string(),
            summary: format!("Service {} is {}", view.name(), view.status.as_str()),
            body: format!("{ready} of {} instances ready", view.instances.len()),
            urgency,
        };
        if notices.try_send(notice).is_err() {
            tracing::warn!(
                "a desktop notice for service {} was dropped: the notifier is behind",
                view.name()
            );
        }
    }

    pub(super) fn publish(&mut self) {
        let mut changed = false;
        // A service's status follows its instances' VMs: any host change may change it.
        let hosts_changed = self.fleet.hosts.values().any(|e| e.dirty);
        let mut readings_of = Vec::new();
        for (id, entry) in self.fleet.hosts.iter_mut() {
            if entry.dirty || entry.readings_dirty {
                entry.published = Arc::new(entry.view.clone());
                changed |= entry.dirty;
                if entry.readings_dirty {
                    readings_of.push(id.clone());
                }
                entry.dirty = false;
                entry.readings_dirty = false;
            }
        }
        if self.services.dirty || (hosts_changed && !self.services.entries.is_empty()) {
            let views = self.service_views();
            // Every change of a service's status reaches the operator as an event.
            let before: Vec<(ServiceName, ServiceStatus)> = self
                .services
                .published
                .iter()
                .map(|s| (s.name().clone(), s.status))
                .collect();
            for view in &views {
                let was = before
                    .iter()
                    .find(|(n, _)| n == view.name())
                    .map(|(_, s)| *s);
                if was.is_some_and(|w| w != view.status) {
                    let level = match view.status {
                        ServiceStatus::Down | ServiceStatus::Unreadable => Level::Error,
                        ServiceStatus::Degraded => Level::Warning,
                        _ => Level::Info,
                    };
                    self.log(
                        level,
                        None,
                        format!("service {} is {}", view.name(), view.status.as_str()),
                    );
                    self.notify(view);
                }
            }
            self.services.published = Arc::new(views);
            self.services.dirty = false;
            self.networks.dirty = true;
            changed = true;
        }
        if self.networks.dirty {
            self.networks.published = Arc::new(super::networks::views::network_views(
                self.networks.records.values().cloned(),
                &self.services.published,
            ));
            self.networks.dirty = false;
            self.networks.tell = true;
            changed = true;
        }
        if self.migrations.dirty {
            self.migrations.published =
                Arc::new(self.migrations.journals.values().cloned().collect());
            self.migrations.dirty = false;
            changed = true;
        }
        if self.drains.dirty {
            self.drains.published = Arc::new(self.drains.progress.values().cloned().collect());
            self.drains.dirty = false;
            changed = true;
        }
        if self.events.dirty {
            self.events.published = Arc::new(self.events.recent.iter().cloned().collect());
            self.events.dirty = false;
            changed = true;
        }
        if self.images.transfers_dirty {
            self.images.published_transfers =
                Arc::new(self.images.transfers.values().cloned().collect());
            self.images.transfers_dirty = false;
            changed = true;
        }
        let images = self.images.needs();
        if *self.images.published != images {
            self.images.published = Arc::new(images);
            changed = true;
        }
        let host_count_changed = self.snapshot_tx.borrow().hosts.len() != self.fleet.hosts.len();
        if !changed && readings_of.is_empty() && !host_count_changed && self.version > 0 {
            return;
        }
        let readings_only = !changed && !host_count_changed && self.version > 0;
        self.version += 1;
        let mut hosts: Vec<Arc<HostView>> = self
            .fleet
            .hosts
            .values()
            .map(|e| e.published.clone())
            .collect();
        hosts.sort_by(|a, b| (a.site_name(), a.id()).cmp(&(b.site_name(), b.id())));
        let _ = self.snapshot_tx.send(Arc::new(Snapshot {
            hosts,
            events: self.events.published.clone(),
            services: self.services.published.clone(),
            migrations: self.migrations.published.clone(),
            drains: self.drains.published.clone(),
            images: self.images.published.clone(),
            image_transfers: self.images.published_transfers.clone(),
            networks: self.networks.published.clone(),
            generated_until_secs: self.statistics.generated_until_secs,
            version: self.version,
        }));
        if let Some(repaint) = self
            .repaint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            repaint(Published {
                readings_only,
                readings_of,
            });
        }
    }
}
