//! Output: what goes out and when — control at once, then pushes to mates and seeds, then
//! paced pushes to downstreams, then repairs and catch-up under LEDBAT, all within the upload
//! limit.

use super::*;

impl SwarmNode {
    /// The next verified piece, new to this member, in arrival order (play it, or feed it to a
    /// jitter buffer).
    pub fn poll_piece(&mut self) -> Option<PieceBytes> {
        self.delivered.pop_front()
    }

    /// The next datagram to send now, if any is due and the upload limit allows it.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        if let Some(t) = self.control.pop_front() {
            let len = t.data.as_bytes().len() as u64;
            self.stats.control_bytes_out += len;
            self.bucket.charge(now, len + DATAGRAM_OVERHEAD);
            self.control_window += len + DATAGRAM_OVERHEAD;
            return Some(t);
        }
        if self.config.behaviour == Behaviour::FreeRider {
            return None; // takes pieces, gives none: no pushes, repairs or catch-up
        }
        while let Some(&(at, _, _)) = self.delayed.front() {
            if at > now {
                break;
            }
            let Some((_, q, urgent)) = self.delayed.pop_front() else {
                break;
            };
            if urgent {
                self.push_urgent(q);
            } else {
                self.push_live(q);
            }
        }
        if let Some(t) = self.next_urgent(now) {
            return Some(t);
        }
        if let Some(t) = self.next_live(now) {
            return Some(t);
        }
        self.next_background(now)
    }

    pub(super) fn next_urgent(&mut self, now: Timestamp) -> Option<Transmit> {
        while let Some(q) = self.urgent.front() {
            if now.saturating_since(q.queued) > MAX_LIVE_WAIT || !self.links.contains_key(&q.to) {
                self.urgent.pop_front();
                self.stats.live_dropped += 1;
                continue;
            }
            if !self.bucket.try_take(now, on_the_line(&q.bytes)) {
                return None;
            }
            let q = self.urgent.pop_front()?;
            return Some(self.sent_piece(now, q, false));
        }
        None
    }

    pub(super) fn next_live(&mut self, now: Timestamp) -> Option<Transmit> {
        while let Some(q) = self.live.front() {
            if now.saturating_since(q.queued) > MAX_LIVE_WAIT {
                self.live.pop_front();
                self.stats.live_dropped += 1;
                continue;
            }
            let len = q.bytes.len() as u64;
            let to = q.to;
            if self.bucket.ready_at(now, on_the_line(&q.bytes)) > now {
                return None;
            }
            let allowed = match self.links.get_mut(&to) {
                None => {
                    self.live.pop_front();
                    continue;
                }
                Some(l) => l.live_allows(now, len),
            };
            if !allowed {
                // The link's congestion control says no: the downstream repairs it or finds
                // another upstream.
                self.live.pop_front();
                self.stats.live_refused += 1;
                continue;
            }
            self.bucket.try_take(now, on_the_line(&q.bytes));
            let q = self.live.pop_front()?;
            return Some(self.sent_piece(now, q, false));
        }
        None
    }

    pub(super) fn next_background(&mut self, now: Timestamp) -> Option<Transmit> {
        if !self.background_waiting {
            return None;
        }
        // Everything queued comes from the ring: while the bucket cannot take even its
        // shortest piece, no link needs a look (stale entries wait for the next one).
        let shortest = self.ring.shortest().map_or(0, |n| n as u64);
        if !self.bucket.would_take_leaving(
            now,
            shortest + DATAGRAM_OVERHEAD,
            self.background_reserve(),
        ) {
            return None;
        }
        debug_assert_eq!(
            self.backlogged,
            self.links
                .iter()
                .filter(|(_, l)| !l.background.is_empty())
                .map(|(a, _)| *a)
                .collect::<Vec<_>>()
        );
        let mut addrs = std::mem::take(&mut self.visit);
        addrs.clear();
        addrs.extend_from_slice(&self.backlogged);
        if addrs.is_empty() {
            self.background_waiting = false;
        }
        // (In address order: the links are an ordered map.) Start the round-robin at a
        // different link each time.
        if !addrs.is_empty() {
            let k = (self.stats.background_pieces_out as usize) % addrs.len();
            addrs.rotate_left(k);
        }
        let sent = self.background_round(now, &addrs);
        self.give_back(addrs);
        sent
    }

    /// One round of [`SwarmNode::next_background`] over `addrs`.
    fn background_round(&mut self, now: Timestamp, addrs: &[SocketAddr]) -> Option<Transmit> {
        for &to in addrs {
            while let Some(&seq) = self.links.get(&to).and_then(|l| l.background.front()) {
                let Some(bytes) = self.servable(now, seq, &to) else {
                    self.pop_background(to);
                    self.stats.repairs_unavailable += 1;
                    continue;
                };
                let len = bytes.len() as u64;
                if !self
                    .links
                    .get(&to)
                    .is_some_and(|l| l.background_allows(len))
                {
                    self.stats.background_blocked_window += 1;
                    break;
                }
                let reserve = self.background_reserve();
                if !self
                    .bucket
                    .try_take_leaving(now, on_the_line(&bytes), reserve)
                {
                    self.stats.background_blocked_upload += 1;
                    return None;
                }
                self.pop_background(to);
                let bytes = match self.config.behaviour {
                    Behaviour::Forger => corrupt(&bytes),
                    _ => bytes,
                };
                self.stats.background_pieces_out += 1;
                return Some(self.sent_piece(
                    now,
                    Queued {
                        to,
                        seq,
                        bytes,
                        queued: now,
                    },
                    true,
                ));
            }
        }
        None
    }

    /// Upload background leaves in the bucket. A member's repairs and catch-up go as soon as
    /// live traffic leaves a gap; the publisher, whose upload is mostly seats, keeps a
    /// datagram's room for the next live piece.
    fn background_reserve(&self) -> u64 {
        match self.config.role {
            Role::Publisher => MAX_DATAGRAM as u64,
            _ => 0,
        }
    }

    /// The piece `seq` if a resend to `to` can still arrive before it must play: how far
    /// it trails the fastest path this member has seen (its age since publishing, less that
    /// path's delay, whatever the clocks' offset), plus half the link's round trip, is within
    /// the repair horizon. Anything later would spend upload on a piece nobody can play.
    pub(super) fn servable(&self, now: Timestamp, seq: u64, to: &SocketAddr) -> Option<PieceBytes> {
        let (bytes, published_us) = self.ring.get_published(seq)?;
        let offset = now.as_micros() as i64 - published_us as i64;
        let behind = offset - self.best_offset_us.unwrap_or(offset).min(offset);
        let one_way = self.links.get(to).map_or(Duration::ZERO, |l| l.srtt / 2);
        let due = Duration::from_micros(behind as u64) + one_way;
        (due <= self.config.repair_horizon).then(|| bytes.clone())
    }

    pub(super) fn sent_piece(&mut self, now: Timestamp, q: Queued, background: bool) -> Transmit {
        let len = q.bytes.len() as u64;
        let club = (q.seq % u64::from(self.k())) as u8;
        self.stats.add_upload(club, len);
        if background {
            if let Some(l) = self.links.get_mut(&q.to) {
                l.on_sent(now, q.seq, len);
            }
        }
        Transmit {
            to: q.to,
            data: Datagram::Piece(q.bytes),
        }
    }

    pub(super) fn send_control(
        &mut self,
        to: SocketAddr,
        encode: impl FnOnce(&mut [u8]) -> Result<usize, crate::wire::WireError>,
    ) {
        let mut buf = [0u8; MAX_DATAGRAM];
        if let Ok(n) = encode(&mut buf) {
            self.control.push_back(Transmit {
                to,
                data: Datagram::Control(buf[..n].to_vec()),
            });
        }
    }

    /// When the member next has something to do without new input.
    pub fn poll_timeout(&self, now: Timestamp) -> Timestamp {
        let mut next = self.next_tick;
        if !self.control.is_empty() {
            return now;
        }
        if let Some((at, _, _)) = self.delayed.front() {
            next = next.min(*at);
        }
        if let Some(q) = self.urgent.front().or(self.live.front()) {
            next = next.min(self.bucket.ready_at(now, on_the_line(&q.bytes)));
        }
        // Background waiting for a link's LEDBAT window waits for that link's ACKs (input) or
        // its loss timer (the tick), not for the clock.
        // (The bucket first: when it alone puts background after `next`, the links need no
        // walk.)
        if self.background_waiting {
            let ready = self
                .bucket
                .ready_at(now, MAX_DATAGRAM as u64 + DATAGRAM_OVERHEAD);
            let full_piece = PAYLOAD + (PieceHeader::LEN + SIGNATURE_LEN) as u64;
            if ready < next
                && self
                    .backlogged
                    .iter()
                    .filter_map(|a| self.links.get(a))
                    .any(|l| l.background_allows(full_piece))
            {
                next = ready;
            }
        }
        next.max(now)
    }
}

/// What a piece costs on the line: its bytes and the datagram's headers.
fn on_the_line(bytes: &PieceBytes) -> u64 {
    bytes.len() as u64 + DATAGRAM_OVERHEAD
}
