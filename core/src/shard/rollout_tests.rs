use super::*;

/// Records what the rollout sends, per connection slot.
#[derive(Default)]
struct Recorder {
    sent: Vec<(usize, DeviceMessage)>,
}

impl Outlet for Recorder {
    fn send(&mut self, idx: usize, m: &DeviceMessage) -> bool {
        self.sent.push((idx, m.clone()));
        true
    }
    fn wake(&mut self, _idx: usize) {}
}

impl Recorder {
    fn take(&mut self) -> Vec<(usize, DeviceMessage)> {
        std::mem::take(&mut self.sent)
    }
    fn chunk_offsets(&mut self, idx: usize) -> Vec<u64> {
        self.take()
            .into_iter()
            .filter_map(|(i, m)| match m {
                DeviceMessage::CodeChunk { offset, .. } if i == idx => Some(offset),
                _ => None,
            })
            .collect()
    }
}

const G: GroupId = GroupId(0);
const V1: CodeVersion = CodeVersion(1);
const V2: CodeVersion = CodeVersion(2);

fn dev(i: u64) -> DeviceId {
    DeviceId(i)
}

fn rollout(max: usize) -> (Rollout, Recorder) {
    let cfg = SenderConfig {
        chunk: 100,
        window: 200,
    };
    let mut r = Rollout::new(max, cfg);
    let mut out = Recorder::default();
    let blob = Bytes::from(vec![7u8; 1000]);
    r.set_code(G, V1, Digest::of(&blob), blob, &[], &mut out);
    (r, out)
}

fn request(r: &mut Rollout, out: &mut Recorder, i: u64, offset: u64) {
    let e = CodeEvent::Request {
        version: V1,
        offset,
    };
    r.on_code(dev(i), i as usize, G, e, out);
}

fn status(r: &Rollout) -> GroupRollout {
    r.status().into_iter().next().unwrap().1
}

#[test]
fn stale_device_is_offered_on_connect_and_a_current_one_is_not() {
    let (mut r, mut out) = rollout(4);
    r.on_connect(dev(1), 1, G, CodeVersion(0), &mut out);
    r.on_connect(dev(2), 2, G, V1, &mut out);
    let sent = out.take();
    assert_eq!(sent.len(), 1);
    assert!(matches!(
        sent[0],
        (
            1,
            DeviceMessage::CodeOffer {
                version: V1,
                size: 1000,
                ..
            }
        )
    ));
    let s = status(&r);
    assert_eq!((s.connected, s.current, s.pending), (2, 1, 1));
}

#[test]
fn acks_open_the_window_and_done_makes_the_device_current() {
    let (mut r, mut out) = rollout(4);
    r.on_connect(dev(1), 1, G, CodeVersion(0), &mut out);
    out.take();
    request(&mut r, &mut out, 1, 0);
    assert_eq!(out.chunk_offsets(1), [0, 100]); // window of 200 bytes
    assert_eq!(status(&r).in_flight, 1);
    let ack = CodeEvent::Ack {
        version: V1,
        offset: 100,
    };
    r.on_code(dev(1), 1, G, ack, &mut out);
    assert_eq!(out.chunk_offsets(1), [200]);
    let done = CodeEvent::Done {
        version: V1,
        ok: true,
    };
    r.on_code(dev(1), 1, G, done, &mut out);
    let s = status(&r);
    assert_eq!((s.current, s.in_flight), (1, 0));
    assert_eq!(r.counters.completed, 1);
    assert_eq!(r.counters.bytes_out, 300);
    assert_eq!(r.active(), 0);
}

#[test]
fn concurrent_transfers_are_bounded_and_waiting_devices_start_in_order() {
    let (mut r, mut out) = rollout(2);
    for i in 1..=4 {
        r.on_connect(dev(i), i as usize, G, CodeVersion(0), &mut out);
    }
    out.take();
    for i in [3, 1, 4, 2] {
        request(&mut r, &mut out, i, 0);
    }
    let started: Vec<usize> = out.take().iter().map(|(i, _)| *i).collect();
    assert!(started.iter().all(|&i| i == 3 || i == 1), "{started:?}");
    assert_eq!((r.active(), r.queued()), (2, 2));
    let s = status(&r);
    assert_eq!((s.in_flight, s.pending), (2, 2));
    // Device 3 fails: its slot goes to the first in line (4), then 1's leaving frees one for 2.
    let done = CodeEvent::Done {
        version: V1,
        ok: false,
    };
    r.on_code(dev(3), 3, G, done, &mut out);
    assert_eq!(out.chunk_offsets(4), [0, 100]);
    r.on_disconnect(dev(1), G, &mut out);
    assert_eq!(out.chunk_offsets(2), [0, 100]);
    assert_eq!(r.counters.failed, 1);
    let s = status(&r);
    assert_eq!(
        (s.connected, s.in_flight, s.failed, s.pending),
        (3, 2, 1, 0)
    );
}

#[test]
fn a_reconnected_device_resumes_from_its_offset() {
    let (mut r, mut out) = rollout(1);
    r.on_connect(dev(1), 1, G, CodeVersion(0), &mut out);
    request(&mut r, &mut out, 1, 0);
    r.on_disconnect(dev(1), G, &mut out);
    assert_eq!(r.active(), 0);
    out.take();
    // Back in another slot, holding 300 bytes.
    r.on_connect(dev(1), 9, G, CodeVersion(0), &mut out);
    assert!(matches!(
        out.take()[..],
        [(9, DeviceMessage::CodeOffer { .. })]
    ));
    request(&mut r, &mut out, 1, 300);
    let offsets: Vec<u64> = out
        .take()
        .into_iter()
        .filter_map(|(_, m)| match m {
            DeviceMessage::CodeChunk { offset, .. } => Some(offset),
            _ => None,
        })
        .collect();
    assert_eq!(offsets, [300, 400]);
}

#[test]
fn a_deploy_offers_every_connected_device_and_replaces_running_transfers() {
    let (mut r, mut out) = rollout(4);
    r.on_connect(dev(1), 1, G, V1, &mut out);
    r.on_connect(dev(2), 2, G, CodeVersion(0), &mut out);
    request(&mut r, &mut out, 2, 0);
    out.take();
    let blob = Bytes::from(vec![8u8; 500]);
    let devices = [(dev(1), 1), (dev(2), 2)];
    r.set_code(G, V2, Digest::of(&blob), blob.clone(), &devices, &mut out);
    let offers: Vec<usize> = out
        .take()
        .iter()
        .filter(|(_, m)| matches!(m, DeviceMessage::CodeOffer { version: V2, .. }))
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(offers, [1, 2]);
    assert_eq!(r.active(), 0);
    let s = status(&r);
    assert_eq!((s.version, s.pending, s.current), (2, 2, 0));
    // An older version arriving late changes nothing.
    r.set_code(G, V1, Digest::of(&blob), blob, &devices, &mut out);
    assert!(out.take().is_empty());
    // A request for the old version gets the current one offered instead.
    request(&mut r, &mut out, 2, 0);
    assert!(matches!(
        out.take()[..],
        [(2, DeviceMessage::CodeOffer { version: V2, .. })]
    ));
}
