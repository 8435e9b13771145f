//! Containers one pointer wide that hold no allocation while empty. A session keeps several
//! queues and buffers that are empty nearly all the time; as plain `VecDeque`s and `BytesMut`s
//! their headers alone took 32 bytes each per connection, idle or not.

use std::collections::VecDeque;

use bytes::BytesMut;

/// A FIFO queue: `None` while empty, released as soon as it empties again. The price is one
/// small allocation per burst of items, not per item.
#[derive(Debug)]
#[allow(clippy::box_collection)] // the box is the point: an 8-byte field while empty
pub(crate) struct Queue<T>(Option<Box<VecDeque<T>>>);

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue(None)
    }
}

impl<T> Queue<T> {
    pub(crate) fn push_back(&mut self, v: T) {
        self.0.get_or_insert_with(Box::default).push_back(v);
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let q = self.0.as_mut()?;
        let v = q.pop_front();
        if q.is_empty() {
            self.0 = None;
        }
        v
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.0.as_ref().and_then(|q| q.front())
    }

    pub(crate) fn back(&self) -> Option<&T> {
        self.0.as_ref().and_then(|q| q.back())
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    /// Items' worth of storage held (0 when empty).
    pub(crate) fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.capacity())
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|q| q.iter())
    }

    /// Takes every item out, leaving the queue empty.
    pub(crate) fn take(&mut self) -> VecDeque<T> {
        self.0.take().map(|q| *q).unwrap_or_default()
    }
}

/// Encoded frames waiting for the caller's next `poll_transmit`: allocated when a frame is
/// written, released when the caller takes them.
#[derive(Debug, Default)]
pub(crate) struct Output(Option<Box<BytesMut>>);

impl Output {
    /// The buffer to encode into.
    pub(crate) fn buf(&mut self) -> &mut BytesMut {
        self.0.get_or_insert_with(Box::default)
    }

    /// What waits to be taken.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |b| &b[..])
    }

    /// Moves everything to `dst` and releases the buffer; false if there was nothing.
    pub(crate) fn drain_into(&mut self, dst: &mut BytesMut) -> bool {
        match self.0.take() {
            Some(b) if !b.is_empty() => {
                dst.extend_from_slice(&b);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_fifo_and_releases_when_empty() {
        let mut q = Queue::default();
        assert!(q.len() == 0 && q.capacity() == 0);
        q.push_back(1);
        q.push_back(2);
        assert_eq!((q.len(), q.front(), q.back()), (2, Some(&1), Some(&2)));
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(q.pop_front(), Some(1));
        assert!(q.capacity() > 0);
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!((q.len(), q.capacity(), q.pop_front()), (0, 0, None));
        q.push_back(3);
        assert_eq!(q.take(), VecDeque::from([3]));
        assert_eq!(q.len(), 0);
        assert_eq!(std::mem::size_of::<Queue<[u8; 80]>>(), 8);
    }

    #[test]
    fn output_drains_and_releases() {
        let mut o = Output::default();
        let mut dst = BytesMut::new();
        assert!(!o.drain_into(&mut dst));
        o.buf().extend_from_slice(b"ab");
        assert!(o.drain_into(&mut dst));
        assert_eq!(&dst[..], b"ab");
        assert!(o.0.is_none());
        assert_eq!(std::mem::size_of::<Output>(), 8);
    }
}
