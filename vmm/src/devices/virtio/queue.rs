//! [`RequestQueue`]: a queue served request by request, as the rng and fs devices do: every chain
//! the driver made available goes to a handler and is completed with the length it returns, with
//! notifications suppressed while draining and one interrupt per pass. Queues the device fills on
//! its own schedule (net RX) take chains one at a time between `begin_pass` and `end_pass`.
//!
//! The driver's rings are untrusted: a used ring that cannot be written or an available index that
//! promises chains which cannot be popped marks the queue broken (ignored until the device is
//! reset) instead of looping forever.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, INTERRUPT_USED_BUFFER};

/// A driver-made chain as handlers see it.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// One request queue of a device.
#[derive(Debug)]
pub struct RequestQueue {
    /// The device's name, for logs.
    device: &'static str,
    queue: Queue,
    broken: bool,
    /// Chains completed since the pass began (device-initiated passes).
    completed_in_pass: usize,
}

impl RequestQueue {
    /// Serves `queue` for the device named `device`.
    pub fn new(device: &'static str, queue: Queue) -> RequestQueue {
        RequestQueue { device, queue, broken: false, completed_in_pass: 0 }
    }

    /// Hands every available chain to `handle` and completes it with the byte count `handle`
    /// returns (bytes written into the chain's device-writable buffers); interrupts the driver if
    /// anything was completed and it asked to be told. Returns how many chains were completed.
    pub fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        handle: impl FnMut(Chain<'_>) -> u32,
    ) -> usize {
        self.serve_at_most(mem, interrupt, usize::MAX, handle)
    }

    /// [`RequestQueue::serve`], stopping after `budget` chains. Notifications then stay off: the
    /// caller must come back (the rest of the chains are not announced again).
    pub fn serve_at_most(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: usize,
        mut handle: impl FnMut(Chain<'_>) -> u32,
    ) -> usize {
        let mut completed = 0;
        // A pass that pops nothing although the driver's index said more had arrived: legitimate
        // once (the chain may have been published between our last pop and re-enabling
        // notifications), a corrupt index if it happens twice in a row.
        let mut empty_pass = false;
        'passes: while !self.broken && completed < budget {
            if self.queue.disable_notification(mem).is_err() {
                self.mark_broken("bad used ring address");
                break;
            }
            let before = completed;
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let written = handle(chain);
                if self.queue.add_used(mem, head, written).is_err() {
                    self.mark_broken("cannot complete a request");
                    break 'passes;
                }
                completed += 1;
                if completed == budget {
                    break 'passes;
                }
            }
            match self.queue.enable_notification(mem) {
                // More arrived while notifications were off: go again, unless passes keep popping
                // nothing, which means the avail index is corrupt (it would loop forever).
                Ok(true) if completed > before || !empty_pass => {
                    empty_pass = completed == before;
                    continue;
                }
                Ok(true) | Err(_) => self.mark_broken("corrupt available ring"),
                Ok(false) => break,
            }
        }
        if completed > 0 && self.queue.needs_notification(mem).unwrap_or(true) {
            interrupt.trigger(INTERRUPT_USED_BUFFER);
        }
        completed
    }

    /// Starts a pass of device-initiated completions (RX): the driver need not notify new buffers
    /// while the device is taking them.
    pub fn begin_pass(&mut self, mem: &GuestMemoryMmap) {
        if !self.broken && self.queue.disable_notification(mem).is_err() {
            self.mark_broken("bad used ring address");
        }
        self.completed_in_pass = 0;
    }

    /// The next chain the driver made available, or `None` when it has none; notifications are
    /// then back on, so its next buffer notifies the queue.
    pub fn next_chain<'m>(&mut self, mem: &'m GuestMemoryMmap) -> Option<Chain<'m>> {
        if self.broken {
            return None;
        }
        if let Some(chain) = self.queue.pop_descriptor_chain(mem) {
            return Some(chain);
        }
        match self.queue.enable_notification(mem) {
            Ok(false) => None,
            // A buffer arrived while notifications were off: take it (once; an index that keeps
            // promising chains that cannot be popped is corrupt).
            Ok(true) => {
                let chain = self.queue.pop_descriptor_chain(mem);
                if chain.is_none() {
                    self.mark_broken("corrupt available ring");
                }
                chain
            }
            Err(_) => {
                self.mark_broken("bad used ring address");
                None
            }
        }
    }

    /// Completes the chain `head` with `written` bytes.
    pub fn complete(&mut self, mem: &GuestMemoryMmap, head: u16, written: u32) {
        if self.queue.add_used(mem, head, written).is_err() {
            self.mark_broken("cannot complete a request");
        } else {
            self.completed_in_pass += 1;
        }
    }

    /// Ends a pass: interrupts the driver if anything was completed and it asked to be told.
    pub fn end_pass(&mut self, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
        if self.completed_in_pass > 0 && self.queue.needs_notification(mem).unwrap_or(true) {
            interrupt.trigger(INTERRUPT_USED_BUFFER);
        }
        self.completed_in_pass = 0;
    }

    fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            crate::guest_log!(
                warn,
                device = self.device,
                why,
                "virtio queue ignored until the device is reset"
            );
            self.broken = true;
        }
    }

    /// Stops serving the queue until the device is reset (the device cannot serve it safely).
    pub fn stop(&mut self) {
        self.mark_broken("the device stopped serving it");
    }

    /// True once the driver broke the queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The underlying queue (its addresses, for tests and diagnostics).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }
}
