//! Input: datagrams from members and the tracker, and the publisher's own pieces: verify, keep,
//! deliver and pass on pieces; grant, refuse and keep links; serve repairs.

use super::*;

impl SwarmNode {
    /// Handles one datagram from `from`.
    pub fn handle_datagram(&mut self, now: Timestamp, from: SocketAddr, datagram: &[u8]) {
        self.started.get_or_insert(now);
        match self.banned.get(&from) {
            Some(until) if *until > now => {
                self.stats.from_banned += 1;
                return;
            }
            Some(_) => {
                self.banned.remove(&from);
            }
            None => {}
        }
        let is_tracker = self.tracker.as_ref().is_some_and(|t| t.addr == from);
        let message = match Message::parse(datagram) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if let Some(l) = self.links.get_mut(&from) {
            l.last_heard = now;
        }
        match message {
            Message::Piece(p) => self.on_piece(now, from, &p, datagram),
            Message::Cookie(c) if is_tracker => self.on_tracker_cookie(now, c.cookie),
            Message::Cookie(c) => self.on_member_cookie(now, from, c.cookie),
            Message::Descriptor(d) if is_tracker => self.on_descriptor(&d),
            Message::Peers(p) if is_tracker && p.channel() == self.channel => {
                self.add_candidates(p.iter());
                self.stats.peer_lists += 1;
                if let Some(t) = &mut self.tracker {
                    t.unanswered = 0;
                }
                if let Some(c) = p.assigned_club().filter(|c| *c < self.k()) {
                    if !self.club_chosen && self.info.is_some() {
                        self.club = c;
                        self.club_chosen = true;
                    }
                }
            }
            Message::Hello(h) => {
                // A member asking for a cookie before it JOINs.
                let reply = Cookie {
                    nonce: h.nonce,
                    cookie: self.cookies.issue(now, from),
                };
                self.send_control(from, |b| reply.encode(b));
            }
            Message::Join(j) if j.channel == self.channel => self.on_join(now, from, &j),
            Message::Accept(a) if a.channel == self.channel => self.on_accept(now, from, &a),
            Message::Nack(n) if n.channel == self.channel => self.on_nack(now, from, &n),
            Message::Ack(a) if a.channel() == self.channel => {
                if let Some(l) = self.links.get_mut(&from) {
                    l.on_acks(now, a.iter());
                }
            }
            _ => self.stats.unexpected += 1,
        }
    }

    pub(super) fn on_tracker_cookie(&mut self, now: Timestamp, cookie: CookieBytes) {
        if let Some(t) = &mut self.tracker {
            t.cookie = Some(cookie);
            t.next_announce = now;
        }
    }

    /// A member's cookie: (re)send our JOIN to it with the cookie echoed.
    pub(super) fn on_member_cookie(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        cookie: CookieBytes,
    ) {
        tracing::trace!(%from, "COOKIE");
        let Some(link) = self.links.get(&from) else {
            return;
        };
        if !link.initiated {
            return;
        }
        if let Some(l) = self.links.get_mut(&from) {
            l.cookie = cookie;
            l.last_join = now;
        }
        let join = self.join_for(now, from, cookie);
        self.send_control(from, |b| join.encode(b));
    }

    pub(super) fn on_descriptor(&mut self, d: &Descriptor<'_>) {
        let Ok(key) = verify_descriptor(d) else {
            self.stats.unexpected += 1;
            return;
        };
        if key != self.key {
            return;
        }
        let newer = self
            .info
            .as_ref()
            .is_none_or(|i| d.epoch_us() > i.first_seq);
        if newer && self.config.role != Role::Publisher {
            self.set_info(ChannelInfo {
                clubs: d.clubs().clamp(1, 64),
                bitrate_bps: d.bitrate_bps(),
                first_seq: d.epoch_us(),
                private: d.private(),
            });
        }
    }

    pub(super) fn on_piece(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        piece: &Piece<'_>,
        bytes: &[u8],
    ) {
        if piece.channel() != self.channel {
            self.stats.unexpected += 1;
            return;
        }
        if !self.links.contains_key(&from) {
            // Not a member we linked with: not worth a signature check.
            self.stats.unknown_sender += 1;
            return;
        }
        let seq = piece.seq();
        let club = (seq % u64::from(self.k())) as u8;
        if let Some(held) = self.ring.get(seq) {
            // A copy that differs from the verified one we hold is a forgery (or corrupt):
            // caught even when the honest copy came first, at the cost of a comparison.
            if !same_bytes(held, bytes) && self.verified_copy(piece, bytes).is_none() {
                self.ban(now, from);
                self.stats.bad_pieces += 1;
                return;
            }
            self.stats.duplicates += 1;
            if let Some(l) = self.links.get_mut(&from) {
                l.pieces_dup += 1;
                if l.mate {
                    self.stats.duplicates_from_mates += 1;
                }
            }
            // (A duplicate may be the answer to a NACK that another path beat.)
            self.queue_ack(now, from, seq, true);
            return;
        }
        if self.ring.is_stale(seq) || self.info.as_ref().is_some_and(|i| seq < i.first_seq) {
            self.stats.stale += 1;
            return;
        }
        // The one copy of the piece, shared by the ring and every queue that sends it.
        let Some(shared) = self.verified_copy(piece, bytes) else {
            self.ban(now, from);
            self.stats.bad_pieces += 1;
            return;
        };
        // A repair is a piece we were missing, or one behind its club's newest (live pieces
        // advance their club).
        let repair = !self.advances_club(seq, club) || self.missing.contains_key(&seq);
        self.queue_ack(now, from, seq, repair);
        self.accept_piece(now, Some(from), seq, club, piece.publish_time_us(), shared);
    }

    /// The piece as shared bytes if its signature holds (or it equals a piece another member
    /// of this process verified); `None` for a forgery.
    fn verified_copy(&self, piece: &Piece<'_>, bytes: &[u8]) -> Option<PieceBytes> {
        let seq = piece.seq();
        if let Some(shared) = self
            .config
            .verified
            .as_ref()
            .and_then(|v| v.lookup(seq, bytes))
        {
            return Some(shared);
        }
        self.key.verify_piece(piece).ok()?;
        let shared: PieceBytes = Arc::from(bytes);
        if let Some(v) = &self.config.verified {
            v.insert(seq, shared.clone());
        }
        Some(shared)
    }

    /// A new, verified piece: keep it, deliver it, pass it on.
    pub(super) fn accept_piece(
        &mut self,
        now: Timestamp,
        from: Option<SocketAddr>,
        seq: u64,
        club: u8,
        publish_time_us: u64,
        bytes: PieceBytes,
    ) {
        self.ring
            .insert(now, seq, club, publish_time_us, bytes.clone());
        // Only pieces that advance their club say how late a path is (repairs and catch-up
        // are late by design).
        let advances = self.advances_club(seq, club);
        let len = bytes.len() as u64;
        self.stats.pieces_new += 1;
        self.stats.add_download(club, len);
        if let Some(m) = self.missing.remove(&seq) {
            if m.tries > 0 {
                self.stats.repaired += 1;
                if let Some(l) = from.and_then(|f| self.links.get_mut(&f)) {
                    l.note_answered();
                }
            }
            if let Some(b) = m.blamed.filter(|b| Some(*b) != from) {
                if let Some(l) = self.links.get_mut(&b) {
                    l.pieces_missed += 1;
                }
            }
        }
        if self.config.role != Role::Publisher {
            self.note_gaps(now, seq, club);
        }
        self.last_new_piece = now;
        self.first_piece.get_or_insert(now);
        if self.config.role != Role::Publisher && self.global_high.is_none_or(|h| seq > h) {
            self.global_high = Some(seq);
            self.global_high_published_us = publish_time_us;
            let lag = self.pieces_in(GLOBAL_GAP_LAG).max(32);
            self.note_global_gaps(now, seq.saturating_sub(lag));
        }
        if let Some(t) = self.club_last.get_mut(usize::from(club)) {
            *t = now;
        }
        if let Some(t) = self.club_first.get_mut(usize::from(club)) {
            t.get_or_insert(now);
        }
        // Lateness of this path behind the fastest one seen (clock offsets cancel).
        let offset = now.as_micros() as i64 - publish_time_us as i64;
        let best = *self.best_offset_us.get_or_insert(offset);
        self.best_offset_us = Some(best.min(offset));
        let late_us = (offset - best.min(offset)) as u64;
        if late_us < self.config.slow_threshold.as_micros() as u64 / 2 {
            if let Some(t) = self.club_fresh.get_mut(usize::from(club)) {
                *t = now;
            }
        }
        if let Some(l) = from.and_then(|f| self.links.get_mut(&f)) {
            l.pieces_new += 1;
            if advances {
                let late = (offset - best.min(offset)) as f64;
                l.lateness_us = l.lateness_us * 0.9 + late * 0.1;
            }
        }
        if self.config.role == Role::Peer {
            self.delivered.push_back(bytes.clone());
        }
        // A piece that reached us far behind the fastest path (a repair, a catch-up) is not
        // pushed on as live: it would spend upload on pieces too late to play downstream, in
        // bursts; a downstream that misses it asks for it.
        if late_us <= FORWARD_LATE.as_micros() as u64 {
            self.forward(now, from, seq, club, bytes);
        } else {
            self.stats.too_late_to_forward += 1;
        }
    }

    /// Pushes a new piece to mates (own club, at once) and downstream links (paced).
    pub(super) fn forward(
        &mut self,
        now: Timestamp,
        from: Option<SocketAddr>,
        seq: u64,
        club: u8,
        bytes: PieceBytes,
    ) {
        if self.config.behaviour == Behaviour::FreeRider {
            return;
        }
        let bytes = match self.config.behaviour {
            Behaviour::Forger => corrupt(&bytes),
            _ => bytes,
        };
        let own = self.config.role != Role::Peer || club == self.club;
        // Reused from piece to piece: no allocation per piece once it has grown.
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        for (addr, l) in &self.links {
            if Some(*addr) == from {
                continue;
            }
            if l.mate && own && l.club == club {
                targets.push((*addr, true));
            } else if !l.mate && l.send.contains(club) {
                // Seeds (the publisher's and relays' links to a club's own members) are
                // urgent too: they start the club's scream.
                let seed = self.config.role != Role::Peer && l.club == club;
                targets.push((*addr, seed));
            }
        }
        // Each piece starts its round at another link: the last of a burst waits for all the
        // others, and it should not be the same member every time.
        if !targets.is_empty() {
            let start = (seq / u64::from(self.k())) as usize % targets.len();
            targets.rotate_left(start);
        }
        for &(to, urgent) in &targets {
            let q = Queued {
                to,
                seq,
                bytes: bytes.clone(),
                queued: now,
            };
            match self.config.behaviour {
                Behaviour::Delayer(d) => self.delayed.push_back((now + d, q, urgent)),
                _ if urgent => self.push_urgent(q),
                _ => self.push_live(q),
            }
        }
        self.targets = targets;
    }

    pub(super) fn push_urgent(&mut self, q: Queued) {
        if self.urgent.len() >= MAX_LIVE_QUEUE {
            self.urgent.pop_front();
            self.stats.live_dropped += 1;
        }
        self.urgent.push_back(q);
    }

    pub(super) fn push_live(&mut self, q: Queued) {
        if self.live.len() >= MAX_LIVE_QUEUE {
            self.live.pop_front();
            self.stats.live_dropped += 1;
        }
        self.live.push_back(q);
    }

    /// Looks for gaps across clubs: any piece up to `upto` (0.8 s of stream behind the newest
    /// one, or, when the stream pauses or ends, the newest) that has not come.
    pub(super) fn note_global_gaps(&mut self, now: Timestamp, upto: u64) {
        let Some(high) = self.global_high else { return };
        let upto = upto.min(high);
        let start = match self.gaps_checked {
            Some(c) if c >= upto => return,
            Some(c) => (c + 1).max(upto.saturating_sub(256)),
            // The first piece: look back as far as catch-up reaches (to the stream's start
            // for a member that was there when it began).
            None => upto.saturating_sub(self.catch_up_pieces()),
        };
        let first = self.info.as_ref().map_or(0, |i| i.first_seq);
        for s in start.max(first)..=upto {
            self.mark_missing(now, s);
        }
        self.gaps_checked = Some(upto);
    }

    /// Records `seq` for repair unless it is here or too old.
    fn mark_missing(&mut self, now: Timestamp, seq: u64) {
        if !self.ring.contains(seq) && !self.ring.is_stale(seq) {
            self.missing.entry(seq).or_insert(Missing {
                noticed: now,
                next_nack: now + self.config.nack_delay,
                tries: 0,
                blamed: None,
            });
        }
    }

    /// Records gaps in `club` up to `seq` for repair.
    pub(super) fn note_gaps(&mut self, now: Timestamp, seq: u64, club: u8) {
        let k = u64::from(self.k());
        let Some(high) = self.club_high.get_mut(usize::from(club)) else {
            return;
        };
        let from = match *high {
            Some(h) if seq <= h => return,
            // A jump (a new publisher session) is not a gap to repair piece by piece.
            Some(h) => (h + k).max(seq.saturating_sub(64 * k)),
            // First piece of the club: look back a little, not to the dawn of the stream.
            None => {
                let first = self.info.as_ref().map_or(seq, |i| i.first_seq);
                let back = seq.saturating_sub(8 * k).max(first);
                back + (club as u64 + k - back % k) % k
            }
        };
        *high = Some(seq);
        let mut s = from;
        while s < seq {
            self.mark_missing(now, s);
            s += k;
        }
    }

    /// Acknowledges `seq` from `from` if it may be background: LEDBAT paces repairs and
    /// catch-up on the ACKs. Pieces from mates, and live pieces (`repair` false) from a link
    /// not catching us up, go unacknowledged (an ACK for them would be matched to nothing).
    pub(super) fn queue_ack(&mut self, now: Timestamp, from: SocketAddr, seq: u64, repair: bool) {
        let Some(l) = self.links.get_mut(&from) else {
            return;
        };
        let catching_up = !l.established || now < l.catch_up_until;
        let repairing = repair && now < l.acks_until;
        if l.mate || !(catching_up || repairing) {
            return;
        }
        if l.pending_acks.is_empty() {
            l.acks_since = now;
            let due = now + ACK_DELAY;
            self.acks_due = Some(self.acks_due.map_or(due, |d| d.min(due)));
        }
        l.pending_acks.push(AckEntry {
            seq,
            received_us: now.as_micros(),
        });
        if l.pending_acks.len() >= Ack::MAX {
            self.flush_acks(from);
        }
    }

    pub(super) fn flush_acks(&mut self, to: SocketAddr) {
        let Some(l) = self.links.get_mut(&to) else {
            return;
        };
        if l.pending_acks.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut l.pending_acks);
        let channel = self.channel;
        self.send_control(to, |b| Ack::encode(channel, &entries, b));
    }

    /// Bans `addr` for a piece that failed verification. Bans expire (an attacker who spoofs a
    /// good member's address costs it a while, not for ever), and the publisher is never
    /// banned: its link is only dropped.
    pub(super) fn ban(&mut self, now: Timestamp, addr: SocketAddr) {
        let publisher = self
            .candidates
            .get(&addr)
            .is_some_and(|c| c.role == Role::Publisher);
        if !publisher && self.banned.insert(addr, now + BAN).is_none() {
            self.stats.peers_banned += 1;
        }
        self.unlink(addr);
        if !publisher {
            self.candidates.remove(&addr);
        }
    }

    pub(super) fn on_join(&mut self, now: Timestamp, from: SocketAddr, j: &Join) {
        tracing::trace!(%from, club = j.club, want = j.want.0, mate = j.mate, leaving = j.leaving, "JOIN");
        if self.cookies.check(now, from, &j.cookie) == CookieCheck::Invalid {
            if self.refuses_at_once(from, j) {
                // Nothing to grant: say so now rather than after a cookie's round trip (a
                // refusal is smaller than the JOIN, so it amplifies nothing either).
                self.send_accept(from, ClubMask::NONE, false);
                self.stats.joins_refused += 1;
                return;
            }
            // Prove the address first: a COOKIE no larger than the JOIN, and nothing else.
            let reply = Cookie {
                nonce: 0,
                cookie: self.cookies.issue(now, from),
            };
            self.send_control(from, |b| reply.encode(b));
            self.stats.joins_unproven += 1;
            return;
        }
        if let Some(l) = self.links.get_mut(&from) {
            l.spare = j.spare;
        }
        if j.leaving {
            if j.departing {
                // Gone from the swarm (its cookie proves the address): asking it for a club,
                // say to replace a silent upstream, would only wait out an unanswered JOIN.
                self.candidates.remove(&from);
            }
            if let Some(l) = self.links.get_mut(&from) {
                l.send = ClubMask::NONE;
                if l.mate {
                    l.mate = false;
                }
                if l.recv.is_empty() {
                    self.unlink(from);
                }
            }
            return;
        }
        if self.info.is_none() || self.leaving {
            return; // nothing to give yet; it will ask again
        }
        if self.candidates.len() < MAX_CANDIDATES || self.candidates.contains_key(&from) {
            self.candidates.entry(from).or_insert(Candidate {
                role: j.role,
                club: j.club,
                free_seats: false,
                backoff_until: Timestamp::ZERO,
                demoted_until: Timestamp::ZERO,
            });
        }
        // A keepalive of a link we granted: it keeps only what it still wants, and may ask
        // for more.
        let kept = self
            .links
            .get_mut(&from)
            .filter(|l| l.mate || !l.send.is_empty())
            .map(|l| {
                if !l.mate {
                    l.send = l.send.intersect(j.want);
                }
                (l.send, l.mate)
            });
        let (granted, mate) = match kept {
            Some((send, true)) => (send.union(ClubMask::one(self.club)), true),
            Some((send, false)) if j.mate || j.want.minus(send).is_empty() => (send, false),
            Some((send, false)) => (self.grant_more(now, from, j, send), false),
            None => self.grant(now, from, j),
        };
        if let Some(l) = self.links.get_mut(&from) {
            l.their_join = now;
            l.last_heard = now;
            if l.mate {
                l.last_keepalive = now;
            }
        }
        self.send_accept(from, granted, mate);
        if j.catch_up && !granted.is_empty() && !mate {
            self.queue_catch_up(now, from, granted);
        }
    }

    /// Whether a peer would refuse a JOIN for clubs from a member not linked with it whatever
    /// its cookie: no seat is free, or it does not give what the JOIN asks. Only peers answer
    /// so before the cookie: the publisher makes room for seeds and relays, and a relay, the
    /// target of spoofed floods, keeps the cookie's answer, whose cost does not grow with its
    /// hundreds of links.
    pub(super) fn refuses_at_once(&self, from: SocketAddr, j: &Join) -> bool {
        if self.config.role != Role::Peer
            || j.mate
            || j.leaving
            || self.info.is_none()
            || self.leaving
            || self.links.contains_key(&from)
        {
            return false;
        }
        j.want.intersect(self.clubs_offered()).is_empty() || self.free_seats() == 0
    }

    /// Answers a JOIN from `to`: what it is granted (nothing: refused), and whether as a mate.
    fn send_accept(&mut self, to: SocketAddr, granted: ClubMask, mate: bool) {
        let accept = Accept {
            channel: self.channel,
            granted,
            role: self.config.role,
            club: self.club,
            mate,
            spare: self.spare_told,
        };
        self.send_control(to, |b| accept.encode(b));
    }

    /// Decides what a new JOIN gets, and records the link.
    pub(super) fn grant(&mut self, now: Timestamp, from: SocketAddr, j: &Join) -> (ClubMask, bool) {
        let unit = self.unit_bytes();
        let is_peer = self.config.role == Role::Peer;
        let mates = self.links.values().filter(|l| l.mate).count();
        if is_peer && j.mate && self.club_chosen && j.club == self.club {
            // A member whose club flows takes one mate more than it asks for itself when the
            // asker starves (the extra mate takes a seat): the first members of a club ask
            // each other and would otherwise fill every mate slot of a clique that nobody
            // after them can join, and the club reaches the rest only as repairs.
            let helps = j.starving && self.own_club_flowing(now);
            let most = self.max_mates() + usize::from(helps) * EXTRA_MATES_ACCEPTED;
            if mates >= most && !self.links.get(&from).is_some_and(|l| l.mate) {
                return (ClubMask::NONE, false);
            }
            let l = self
                .links
                .get_or_insert_with(from, || Link::new(now, j.role, j.club, false, unit));
            l.mate = true;
            l.established = true;
            l.club = j.club;
            return (ClubMask::one(self.club), true);
        }
        let offer = self.affordable(now, j, j.want);
        if offer.is_empty() || self.downstream_links() >= self.downstream_cap() {
            self.stats.joins_refused += 1;
            return (ClubMask::NONE, false);
        }
        let l = self
            .links
            .get_or_insert_with(from, || Link::new(now, j.role, j.club, false, unit));
        l.send = l.send.union(offer);
        l.club = j.club;
        let share = unit * u64::from(l.send.len());
        l.set_share(share);
        self.stats.joins_granted += 1;
        tracing::debug!(%from, clubs = offer.0, club = j.club, "granted");
        (offer, false)
    }

    /// A member we push `send` to asks for more clubs: it gets as many more as the upload
    /// affords (a relay asked for a club its peer sources stopped giving, say). What it
    /// receives from now on.
    pub(super) fn grant_more(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        j: &Join,
        send: ClubMask,
    ) -> ClubMask {
        let more = self.affordable(now, j, j.want.minus(send));
        if more.is_empty() {
            self.stats.joins_refused += 1;
            return send;
        }
        let unit = self.unit_bytes();
        if let Some(l) = self.links.get_mut(&from) {
            l.send = l.send.union(more);
            l.set_share(unit * u64::from(l.send.len()));
        }
        self.stats.joins_granted += 1;
        tracing::debug!(%from, clubs = more.0, club = j.club, "granted more");
        send.union(more)
    }

    /// Which of the clubs `want` that `j` asks for this member offers and its upload affords
    /// (making room, at the publisher, for a seed or a relay).
    pub(super) fn affordable(&mut self, now: Timestamp, j: &Join, want: ClubMask) -> ClubMask {
        let mut offer = want.intersect(self.clubs_offered());
        if self.config.role == Role::Publisher {
            self.make_room_for_seed(now, j);
            // At most a few seeds per club, and a second seed only while every other club can
            // still have its first.
            let k = self.k();
            let seeds = self.seeds_per_club();
            let seeded = |c: u8| self.links.values().filter(|l| l.send.contains(c)).count();
            let unseeded = (0..k).filter(|c| seeded(*c) == 0).count() as u64;
            let free = self.upload_units().saturating_sub(self.units_used());
            for c in offer.iter() {
                let n = seeded(c);
                let starves_others = n >= 1 && free.saturating_sub(1) < unseeded;
                // Relays are not held to the per-club cap: they take seats from peer seeds
                // (below), since every seat they hold feeds hundreds.
                if j.role == Role::Peer && (n >= seeds || starves_others) {
                    offer = offer.minus(ClubMask::one(c));
                }
            }
        }
        if self.config.role == Role::Publisher && j.role == Role::Relay {
            self.make_room_for_relay(u64::from(offer.len()));
        }
        let free = self.upload_units().saturating_sub(self.units_used());
        // As many of the clubs asked for as the upload affords.
        ClubMask(
            offer
                .iter()
                .take(usize::try_from(free).unwrap_or(usize::MAX))
                .fold(0, |m, c| m | (1u64 << c)),
        )
    }

    /// Publisher: a member asks to seed its club and the club's seats are taken. Members ask
    /// only when their club is not reaching them, so the oldest seat (if it has had a few
    /// seconds) goes to the asker: a seed that went bad, or hoards, is rotated out. Once the
    /// stream flows, and one seat of a club in [`SEAT_ROTATION_GAP`]: a stalled club's
    /// members all ask at once, and a seat for each took every working seed away.
    pub(super) fn make_room_for_seed(&mut self, now: Timestamp, j: &Join) {
        let c = j.club;
        if j.role != Role::Peer || j.want != ClubMask::one(c) {
            return;
        }
        let seats: Vec<(Timestamp, SocketAddr)> = self
            .links
            .iter()
            .filter(|(_, l)| l.send.contains(c) && l.club == c)
            .map(|(a, l)| (l.established_at, *a))
            .collect();
        let free = self.upload_units().saturating_sub(self.units_used());
        if seats.is_empty() {
            if free == 0 || self.downstream_links() >= self.downstream_cap() {
                self.unseat_for_unseeded_club(now, c);
            }
            return;
        }
        if seats.len() < self.seeds_per_club() && free > 1 {
            return;
        }
        // Before the stream begins no member starves (nothing flows to anyone), and a seat of
        // a club goes to a starving member at most once in the rotation gap.
        if self.first_piece.is_none() {
            return;
        }
        let rotated = self.seat_rotated.get(usize::from(c)).copied().flatten();
        if rotated.is_some_and(|t| now.saturating_since(t) < SEAT_ROTATION_GAP) {
            return;
        }
        if let Some(&oldest) = seats.iter().min() {
            if self.unseat(now, oldest, c) {
                if let Some(t) = self.seat_rotated.get_mut(usize::from(c)) {
                    *t = Some(now);
                }
            }
        }
    }

    /// Publisher: the seed at `seat` (held since `.0`) stops getting club `c`, if it has held
    /// the seat for its tenure. Whether it did.
    fn unseat(&mut self, now: Timestamp, seat: (Timestamp, SocketAddr), c: u8) -> bool {
        let (since, addr) = seat;
        if now.saturating_since(since) < SEED_TENURE {
            return false;
        }
        let Some(l) = self.links.get_mut(&addr) else {
            return false;
        };
        l.send = l.send.minus(ClubMask::one(c));
        if l.send.is_empty() && l.recv.is_empty() {
            self.unlink(addr);
        }
        self.stats.seeds_rotated += 1;
        true
    }

    /// Publisher: club `c` has no seed and every seat or downstream link is taken (its only
    /// seed left while the other clubs took the spare ones): the oldest seed of the club with
    /// the most seeds (two or more, past its tenure) gives up its seat. Without this the club stayed dark for
    /// every member until another seed happened to leave.
    pub(super) fn unseat_for_unseeded_club(&mut self, now: Timestamp, c: u8) {
        let mut seeds = [0usize; 64];
        for l in self.links.values() {
            if l.role == Role::Peer && l.club != c && l.send.contains(l.club) {
                if let Some(n) = seeds.get_mut(usize::from(l.club)) {
                    *n += 1;
                }
            }
        }
        let Some((richest, &most)) = seeds
            .iter()
            .enumerate()
            .max_by_key(|(d, n)| (**n, usize::MAX - d))
        else {
            return;
        };
        if most < 2 {
            return;
        }
        let richest = richest as u8;
        let oldest = self
            .links
            .iter()
            .filter(|(_, l)| l.role == Role::Peer && l.club == richest && l.send.contains(richest))
            .map(|(a, l)| (l.established_at, *a))
            .min();
        if let Some(oldest) = oldest {
            let _ = self.unseat(now, oldest, richest);
        }
    }

    /// Publisher: relays amplify, so a relay's JOIN takes seats from peer seeds (which then
    /// find the relay) until `units` are free.
    pub(super) fn make_room_for_relay(&mut self, units: u64) {
        let mut seeds: Vec<(Timestamp, SocketAddr)> = self
            .links
            .iter()
            .filter(|(_, l)| l.role == Role::Peer && !l.send.is_empty())
            .map(|(a, l)| (l.established_at, *a))
            .collect();
        seeds.sort_unstable();
        for (_, addr) in seeds {
            if self.upload_units().saturating_sub(self.units_used()) >= units {
                break;
            }
            self.unlink(addr);
            self.stats.seeds_rotated += 1;
        }
    }

    pub(super) fn queue_catch_up(&mut self, now: Timestamp, to: SocketAddr, clubs: ClubMask) {
        let recent = self
            .ring
            .recent(now, self.config.catch_up, |c| clubs.contains(c));
        if self.links.contains_key(&to) {
            for (seq, _) in &recent {
                self.queue_background(to, *seq);
            }
            self.stats.catch_up_queued += recent.len() as u64;
        }
    }

    pub(super) fn on_accept(&mut self, now: Timestamp, from: SocketAddr, a: &Accept) {
        tracing::trace!(%from, granted = a.granted.0, mate = a.mate, "ACCEPT");
        let window = self.ack_window();
        let Some(l) = self.links.get_mut(&from) else {
            return;
        };
        // Only an answer to what we asked: a mate link only if we asked to be mates (in our
        // own club), and no clubs we did not ask for.
        if !l.initiated || a.mate != l.wants_mate || (a.mate && a.club != self.club) {
            return;
        }
        l.last_keepalive = now;
        l.spare = a.spare;
        if a.granted.intersect(l.wanted).is_empty() {
            // Refused (full): try someone else, and not this one for a while.
            match self.links.get_mut(&from) {
                Some(l) if !l.send.is_empty() => {
                    l.initiated = false;
                    l.wanted = ClubMask::NONE;
                    l.wants_mate = false;
                    l.established = true;
                }
                _ => {
                    self.unlink(from);
                }
            }
            if let Some(c) = self.candidates.get_mut(&from) {
                c.backoff_until = now + REFUSED_BACKOFF;
                c.free_seats = false;
            }
            return;
        }
        // (An established link asked for more and answered without them: the answer to an
        // earlier keepalive, or a refusal. Either way the ask stands until `widen_at`, and is
        // then given up, so an answer overtaken by our ask does not cancel it.)
        if !l.established {
            l.established_at = now;
            l.catch_up_until = now + window; // its catch-up follows
        }
        let recv = if a.mate {
            ClubMask::NONE
        } else {
            a.granted.intersect(l.wanted)
        };
        let grew = !recv.minus(l.recv).is_empty();
        if l.established && grew {
            // It gives us more clubs: the link starts again, so that their silence and its
            // misses count from now (those clubs had been missing, which is why we asked).
            l.established_at = now;
            l.pieces_new = 0;
            l.pieces_dup = 0;
            l.pieces_missed = 0;
        }
        l.established = true;
        l.mate = a.mate;
        l.club = a.club;
        l.role = a.role;
        l.recv = recv;
        if grew && a.role != Role::Peer {
            self.drop_covered_peer_sources();
        }
    }

    pub(super) fn on_nack(&mut self, now: Timestamp, from: SocketAddr, n: &Nack) {
        if !self.links.contains_key(&from) || self.config.behaviour == Behaviour::FreeRider {
            self.stats.nacks_ignored += 1;
            return;
        }
        let mut served = 0;
        let mut missed = 0;
        let seqs: Vec<u64> = n.seqs().collect();
        for seq in seqs {
            if self.servable(now, seq, &from).is_some() {
                if self.queue_background(from, seq) {
                    served += 1;
                }
            } else {
                missed += 1;
            }
        }
        self.stats.repairs_served += served;
        self.stats.repairs_unavailable += missed;
        tracing::trace!(%from, base = n.base, served, missed, "NACK served");
    }

    /// Publisher: a new signed piece to seed into its club.
    pub fn publish(&mut self, now: Timestamp, bytes: PieceBytes) {
        self.started.get_or_insert(now);
        let Ok(piece) = Piece::parse(&bytes) else {
            return;
        };
        let seq = piece.seq();
        let club = (seq % u64::from(self.k())) as u8;
        let t = piece.publish_time_us();
        self.accept_piece(now, None, seq, club, t, bytes);
    }
}
