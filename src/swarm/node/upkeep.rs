//! Timers: tracker announces, club choice, link keepalives and expiry, finding and replacing
//! upstreams, NACKs, and leaving.

use super::*;

impl SwarmNode {
    /// Runs timers: tracker announces, link upkeep, ACK flushes, NACKs, replacement.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.started.get_or_insert(now);
        self.flush_due_acks(now);
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        self.measure_control(now);
        self.tracker_upkeep(now);
        if self.info.is_none() || self.leaving {
            return;
        }
        self.choose_club(now);
        self.expire_links(now);
        self.keep_links_alive(now);
        self.replace_bad_upstreams(now);
        if now >= self.next_search {
            self.next_search = now + SEARCH;
            self.find_mates(now);
            self.find_sources(now);
        }
        if now.saturating_since(self.last_new_piece) > STREAM_PAUSE {
            if let Some(h) = self.global_high {
                self.note_global_gaps(now, h);
            }
        }
        self.send_nacks(now);
        for l in self.links.values_mut() {
            l.detect_losses(now);
        }
    }

    /// Once a second: how much upload control took (smoothed: a quarter of the last second's
    /// and three quarters of what it was), and the free upload our JOINs and ACCEPTs tell.
    fn measure_control(&mut self, now: Timestamp) {
        let elapsed = now.saturating_since(self.control_since);
        if elapsed < CONTROL_WINDOW {
            return;
        }
        let per_s = self.control_window * 1_000_000 / (elapsed.as_micros() as u64).max(1);
        self.control_rate = (self.control_rate * 3 + per_s) / 4;
        self.spare_told = self.spare();
        self.control_window = 0;
        self.control_since = now;
    }

    pub(super) fn flush_due_acks(&mut self, now: Timestamp) {
        if self.acks_due.is_none_or(|t| now < t) {
            return; // (this runs on every wake-up; most find nothing due)
        }
        let due = self.links_where(|l| {
            !l.pending_acks.is_empty() && now.saturating_since(l.acks_since) >= ACK_DELAY
        });
        for &a in &due {
            self.flush_acks(a);
        }
        self.give_back(due);
        self.acks_due = self
            .links
            .values()
            .filter(|l| !l.pending_acks.is_empty())
            .map(|l| l.acks_since + ACK_DELAY)
            .min();
    }

    pub(super) fn tracker_upkeep(&mut self, now: Timestamp) {
        let Some(t) = &self.tracker else { return };
        let due = now >= t.next_announce || t.retry_due(now);
        // A club that lost its source (the upstream left) is worth asking about at once: the
        // tracker lists members of it with free seats.
        let may_tell_needs =
            t.cookie.is_some() && now.saturating_since(t.last_announce) >= NEEDS_ANNOUNCE;
        let said_needed = t.said_needed;
        if !due && !may_tell_needs {
            return;
        }
        let needs = self.clubs_needed(now);
        if !due && needs.minus(said_needed).is_empty() {
            return;
        }
        let unanswered = self.tracker.as_ref().is_some_and(|t| t.cookie.is_none());
        let interval = if !self.club_chosen || self.info.is_none() || unanswered {
            // Waiting for the channel to appear, for a peer list, or for the tracker to answer
            // at all (a lost HELLO or COOKIE): ask again soon.
            Duration::from_millis(250)
        } else if self.picture_incomplete()
            || !self.all_clubs_sourced()
            || !self.own_club_flowing(now)
        {
            // Members that have not said their club yet, clubs nobody is known in, clubs
            // still without a source (the members we know may all be full), or an own club
            // that does not flow (the publisher may have come after our last list): more names
            // help.
            Duration::from_secs(1)
        } else {
            self.config.announce_interval
        };
        let Some(t) = &mut self.tracker else { return };
        let addr = t.addr;
        t.next_announce = now + interval;
        t.last_announce = now;
        let cookie = t.cookie;
        let nonce = t.nonce;
        if let Some(d) = self.descriptor.clone() {
            self.control.push_back(Transmit {
                to: addr,
                data: Datagram::Control(d),
            });
        }
        match cookie {
            None => {
                let hello = Hello {
                    channel: self.channel,
                    nonce,
                };
                self.send_control(addr, |b| hello.encode(b));
            }
            Some(cookie) => {
                let a = TrackerAnnounce {
                    channel: self.channel,
                    cookie,
                    role: self.config.role,
                    club: self.club,
                    upload_kbps: self
                        .config
                        .upload_limit_bps
                        .map_or(u32::MAX, |b| u32::try_from(b / 1000).unwrap_or(u32::MAX)),
                    free_seats: self.free_seats(),
                    needs,
                    leaving: false,
                };
                self.send_control(addr, |b| a.encode(b));
                if let Some(t) = &mut self.tracker {
                    t.said_needed = needs;
                    t.unanswered = t.unanswered.saturating_add(1);
                }
            }
        }
    }

    /// Downstream seats still free, as the tracker is told (up to 255).
    pub(super) fn free_seats(&self) -> u8 {
        // (Before it knows the stream, it cannot count seats.)
        if self.info.is_none() || self.downstream_links() >= self.downstream_cap() {
            return 0;
        }
        let free = self.upload_units().saturating_sub(self.units_used());
        u8::try_from(free).unwrap_or(u8::MAX)
    }

    /// Clubs with no source here (the own club counts while its mates carry it on time), as
    /// the tracker is told: it lists members of them with free seats first.
    pub(super) fn clubs_needed(&self, now: Timestamp) -> ClubMask {
        if self.config.role == Role::Publisher {
            return ClubMask::NONE;
        }
        let mut sourced = self
            .links
            .values()
            .filter(|l| !l.mate && l.established)
            .fold(ClubMask::NONE, |m, l| m.union(l.recv));
        let mates_carry = self.own_club_flowing(now) && self.links.values().any(|l| l.mate);
        if self.config.role == Role::Peer && mates_carry {
            sourced = sourced.union(ClubMask::one(self.club));
        }
        ClubMask::all(self.k()).minus(sourced)
    }

    /// Whether the tracker's next list may tell more: members that had not chosen a club, or
    /// a club with no member known.
    pub(super) fn picture_incomplete(&self) -> bool {
        let k = self.k();
        let mut known = ClubMask::NONE;
        for c in self.candidates.values() {
            if c.role == Role::Peer && c.club == NO_CLUB {
                return true;
            }
            if c.role == Role::Peer && c.club < k {
                known = known.union(ClubMask::one(c.club));
            }
        }
        self.config.role != Role::Publisher && known.len() < u32::from(k)
    }

    /// A peer joins the club with the fewest members it has heard of.
    pub(super) fn choose_club(&mut self, now: Timestamp) {
        if self.club_chosen {
            return;
        }
        // With a tracker, the tracker assigns the club (it sees everyone, so clubs stay even);
        // a peer chooses by itself only if no assignment came for a while after the channel
        // appeared.
        let since = *self.info_since.get_or_insert(now);
        if self.tracker.is_some() && now.saturating_since(since) < CLUB_ASSIGNMENT_WAIT {
            return;
        }
        let k = self.k();
        let mut counts = vec![0usize; usize::from(k)];
        for c in self.candidates.values() {
            if c.role == Role::Peer && c.club < k {
                counts[usize::from(c.club)] += 1;
            }
        }
        let least = counts.iter().copied().min().unwrap_or(0);
        let choices: Vec<u8> = (0..k)
            .filter(|c| counts[usize::from(*c)] == least)
            .collect();
        self.club = *choices.choose(&mut self.rng).unwrap_or(&0);
        self.club_chosen = true;
        if let Some(t) = &mut self.tracker {
            t.next_announce = now; // tell the tracker our club
        }
    }

    /// Each side of a link lives on its own keepalives: what we push, on the other side's
    /// JOINs; what we asked for, on its ACCEPTs; a mate link, on either.
    pub(super) fn expire_links(&mut self, now: Timestamp) {
        let timeout = self.config.link_timeout;
        let mut dead = Vec::new();
        for (a, l) in self.links.iter_mut() {
            if !l.mate && !l.send.is_empty() && now.saturating_since(l.their_join) > timeout {
                l.send = ClubMask::NONE;
                self.stats.links_expired += 1;
            }
            // A JOIN nobody answers (the member left, or its answers are lost) frees its slot
            // sooner than a link that went quiet: a new member has few slots and many clubs.
            // An established link is alive while the member answers our keepalives or sends us
            // anything else: a few lost ACCEPTs must not cut an upstream whose pieces arrive
            // (whether it still serves us, its next ACCEPT says; silence is replaced apart).
            let (wait, alive_at) = if l.established {
                (timeout, l.last_keepalive.max(l.last_heard))
            } else {
                (UNANSWERED_JOIN, l.last_keepalive)
            };
            let asked_stale = (l.initiated || l.mate) && now.saturating_since(alive_at) > wait;
            let empty = !l.initiated && !l.mate && l.send.is_empty();
            if asked_stale || empty {
                dead.push((*a, asked_stale, !l.established));
            }
        }
        for (a, asked_stale, unanswered) in dead {
            if asked_stale {
                self.stats.links_expired += 1;
                self.drop_link(now, a, unanswered);
            } else {
                self.unlink(a);
            }
        }
    }

    pub(super) fn keep_links_alive(&mut self, now: Timestamp) {
        let keepalive = self.config.keepalive;
        let due = self.links_where(|l| {
            let every = if l.established {
                keepalive
            } else {
                UNESTABLISHED_KEEPALIVE
            };
            l.initiated && now.saturating_since(l.last_join) >= every
        });
        for &a in &due {
            let cookie = self.links.get(&a).map(|l| l.cookie).unwrap_or_default();
            let join = self.join_for(now, a, cookie);
            self.send_control(a, |b| join.encode(b));
            if let Some(l) = self.links.get_mut(&a) {
                l.last_join = now;
            }
        }
        self.give_back(due);
    }

    /// The JOIN that asks for (or keeps) the link to `to`.
    pub(super) fn join_for(&self, now: Timestamp, to: SocketAddr, cookie: CookieBytes) -> Join {
        let l = self.links.get(&to);
        let mate = l.is_some_and(|l| l.wants_mate);
        Join {
            channel: self.channel,
            cookie,
            role: self.config.role,
            club: self.club,
            want: l.map_or(ClubMask::NONE, |l| l.wanted),
            mate,
            catch_up: l.is_some_and(|l| !l.established),
            leaving: false,
            starving: mate && self.own_club_starving(now),
            departing: false,
            spare: self.spare_told,
        }
    }

    pub(super) fn drop_link(&mut self, now: Timestamp, addr: SocketAddr, backoff: bool) {
        self.stop_receiving(addr);
        if backoff {
            if let Some(c) = self.candidates.get_mut(&addr) {
                c.backoff_until = now + REPLACED_BACKOFF;
                c.demoted_until = now + REPLACED_DEMOTION;
            }
        }
    }

    /// Ends what we receive from `addr` (telling it, if we asked for the link), and keeps the
    /// link only if we still push to it as its upstream.
    pub(super) fn stop_receiving(&mut self, addr: SocketAddr) {
        let Some(l) = self.links.get(&addr) else {
            return;
        };
        if l.initiated {
            let mut leave = self.join_for_link(l, l.cookie);
            leave.leaving = true;
            self.send_control(addr, |b| leave.encode(b));
        }
        match self.links.get_mut(&addr) {
            Some(l) if !l.mate && !l.send.is_empty() => {
                l.recv = ClubMask::NONE;
                l.wanted = ClubMask::NONE;
                l.wants_mate = false;
                l.initiated = false;
                l.established = true;
            }
            _ => {
                self.unlink(addr);
            }
        }
    }

    pub(super) fn join_for_link(&self, l: &Link, cookie: CookieBytes) -> Join {
        Join {
            channel: self.channel,
            cookie,
            role: self.config.role,
            club: self.club,
            want: l.wanted,
            mate: l.wants_mate,
            catch_up: false,
            leaving: false,
            starving: false,
            departing: false,
            spare: 0,
        }
    }

    /// Replaces upstreams that went silent, lose too much or trail the fastest path.
    pub(super) fn replace_bad_upstreams(&mut self, now: Timestamp) {
        let k = self.k();
        let silence = self.silence_for();
        // The stream is live if some club delivered recently.
        let live = self
            .club_last
            .iter()
            .any(|t| *t > Timestamp::ZERO && now.saturating_since(*t) < silence / 2);
        let mut bad: Vec<(SocketAddr, UpstreamFault)> = Vec::new();
        for (addr, l) in &self.links {
            if !l.initiated || !l.established || l.mate {
                continue;
            }
            let silent_club = l.recv.iter().filter(|c| *c < k).any(|c| {
                let last = self.club_last[usize::from(c)];
                // Silence counts from the link's start or the stream's, whichever is later.
                let since = last
                    .max(l.established_at)
                    .max(self.first_piece.unwrap_or(now));
                live && now.saturating_since(since) > silence
            });
            let received = l.pieces_new + l.pieces_dup;
            // A link that has sent nothing at all while its clubs reach us by other paths
            // (repairs, another link) is not going to: a free rider, or a member that does
            // not get its own club.
            let since = l.established_at.max(self.first_piece.unwrap_or(now));
            let barren = live
                && received == 0
                && now.saturating_since(since) > BARREN_LINK
                && l.recv
                    .iter()
                    .filter(|c| *c < k)
                    .any(|c| self.club_last[usize::from(c)] > since);
            // Repairs fill random losses; only an upstream that misses most of what it should
            // send is replaced (replacing for random loss churns links and loses more).
            let lossy = received >= 50 && l.pieces_missed * 2 > received;
            let slow =
                received >= 50 && l.lateness_us > self.config.slow_threshold.as_micros() as f64;
            let why = if silent_club || barren {
                UpstreamFault::Silent
            } else if lossy {
                UpstreamFault::Lossy
            } else if slow {
                UpstreamFault::Slow
            } else {
                continue;
            };
            bad.push((*addr, why));
        }
        // Replacing an upstream nobody else can stand in for leaves its clubs with no source
        // at all (and backs it off): in a small swarm, where every other member of a club was
        // replaced or refused lately, a poor source is better than none.
        bad.retain(|(addr, _)| self.replaceable(now, addr));
        for (addr, why) in bad {
            *match why {
                UpstreamFault::Silent => &mut self.stats.replaced_silent,
                UpstreamFault::Lossy => &mut self.stats.replaced_lossy,
                UpstreamFault::Slow => &mut self.stats.replaced_slow,
            } += 1;
            tracing::debug!(peer = %addr, ?why, "replacing upstream");
            self.drop_link(now, addr, true);
            self.stats.peers_replaced += 1;
        }
    }

    /// Whether some other member could give us the clubs the upstream `addr` sends: another
    /// source of one of them, or a candidate we may ask for one.
    fn replaceable(&self, now: Timestamp, addr: &SocketAddr) -> bool {
        let Some(link) = self.links.get(addr) else {
            return false;
        };
        let clubs = link.recv;
        let other_source = self
            .links
            .iter()
            .any(|(a, l)| a != addr && clubs.iter().any(|c| l.is_source_of(c)));
        other_source
            || self.candidates.iter().any(|(a, c)| {
                a != addr
                    && self.eligible(now, a, c)
                    && !self
                        .clubs_given_by(c.role, c.club)
                        .intersect(clubs)
                        .is_empty()
            })
    }

    /// Clubs a member of `role` in `club` would push to us: a relay any; the publisher any to
    /// a relay, only its own club to a peer (a seed seat); a peer its own club.
    fn clubs_given_by(&self, role: Role, club: u8) -> ClubMask {
        match (role, self.config.role) {
            (Role::Peer, _) => ClubMask::one(club),
            (Role::Publisher, Role::Peer) => ClubMask::one(self.club),
            _ => ClubMask::all(self.k()),
        }
    }

    /// Whether a peer's own club arrives on time (not only as repairs); always, for relays and
    /// the publisher.
    pub(super) fn own_club_flowing(&self, now: Timestamp) -> bool {
        if self.config.role != Role::Peer {
            return true;
        }
        self.club_fresh
            .get(usize::from(self.club))
            .is_some_and(|last| {
                *last > Timestamp::ZERO && now.saturating_since(*last) < self.silence_for()
            })
    }

    /// Whether a peer's own club has not reached it on time for a silence while other clubs
    /// have been reaching it longer than that: its mates do not reach the club's source.
    pub(super) fn own_club_starving(&self, now: Timestamp) -> bool {
        let settled = self
            .first_piece
            .is_some_and(|t| now.saturating_since(t) > self.silence_for());
        settled && !self.own_club_flowing(now)
    }

    pub(super) fn eligible(&self, now: Timestamp, addr: &SocketAddr, c: &Candidate) -> bool {
        // A member that only takes from us may still be asked to give.
        let free = self.links.get(addr).is_none_or(|l| !l.initiated && !l.mate);
        free && !self.banned.contains_key(addr) && c.backoff_until <= now
    }

    pub(super) fn pending_joins(&self) -> usize {
        self.links
            .values()
            .filter(|l| l.initiated && !l.established)
            .count()
    }

    pub(super) fn find_mates(&mut self, now: Timestamp) {
        if self.config.role != Role::Peer || !self.club_chosen {
            return;
        }
        let have = self
            .links
            .values()
            .filter(|l| l.mate || l.wants_mate)
            .count();
        let want = self.max_mates().saturating_sub(have);
        if want == 0 || self.pending_joins() >= MAX_PENDING_JOINS {
            return;
        }
        let mut options: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|(a, c)| {
                c.role == Role::Peer && c.club == self.club && self.eligible(now, a, c)
            })
            .map(|(a, _)| *a)
            .collect();
        options.sort_unstable();
        options.shuffle(&mut self.rng);
        for addr in options.into_iter().take(want) {
            self.ask(now, addr, ClubMask::one(self.club), true);
        }
    }

    /// Asks one upstream for every club that has no source.
    pub(super) fn find_sources(&mut self, now: Timestamp) {
        if !self.club_chosen || self.pending_joins() >= MAX_PENDING_JOINS {
            return;
        }
        let k = self.k();
        let mut needed = ClubMask::NONE;
        // A relay feeds hundreds: a club it gets only from peers (a hop further, and a loop
        // with no source when those peers get it from the relay) is a club it still needs
        // from the publisher or another relay.
        let relay = self.config.role == Role::Relay;
        // Clubs an upstream gives us, or that we asked one for and still await.
        let mut sourced = ClubMask::NONE;
        for l in self.links.values() {
            if relay && l.role == Role::Peer {
                continue;
            }
            if !l.mate && l.established {
                sourced = sourced.union(l.recv);
            }
            if l.initiated && (!l.established || now < l.widen_at) {
                sourced = sourced.union(l.wanted);
            }
        }
        for c in 0..k {
            let mut covered = sourced.contains(c);
            if c == self.club && self.config.role == Role::Peer {
                // Mates carry the own club while it flows on time; when it does not (no mate
                // reaches a seed, or pieces only come as repairs), ask for a source.
                covered |= self.own_club_flowing(now) && self.links.values().any(|l| l.mate);
            }
            if !covered {
                needed = needed.union(ClubMask::one(c));
            }
        }
        if self.config.role == Role::Publisher || needed.is_empty() {
            return;
        }
        needed = self.widen_upstreams(now, needed);
        // What peers can be asked for: what no peer gives us yet (a relay's other needs are
        // for the publisher and relays only).
        let from_peers = if relay {
            needed.minus(self.clubs_from_peers())
        } else {
            needed
        };
        if needed.is_empty() {
            return;
        }
        // Own club: its mates are sources once linked; still ask the publisher or a relay to
        // seed it, which is how a club's first pieces arrive.
        let mut best: Vec<(u8, SocketAddr)> = self
            .candidates
            .iter()
            .filter(|(addr, c)| self.eligible(now, addr, c))
            .filter_map(|(addr, c)| Some((self.source_rank(now, c, from_peers)?, *addr)))
            .collect();
        best.sort_unstable();
        // Shuffle within each rank, deterministically.
        let mut i = 0;
        while i < best.len() {
            let r = best[i].0;
            let j = best[i..]
                .iter()
                .position(|(x, _)| *x != r)
                .map_or(best.len(), |p| i + p);
            best[i..j].shuffle(&mut self.rng);
            i = j;
        }
        for (_, addr) in best {
            if needed.is_empty() || self.pending_joins() >= MAX_PENDING_JOINS {
                break;
            }
            let c = self.candidates[&addr];
            let asked_of_it = if c.role == Role::Peer {
                from_peers
            } else {
                needed
            };
            let want = self.clubs_given_by(c.role, c.club).intersect(asked_of_it);
            if want.intersect(needed).is_empty() {
                continue;
            }
            self.ask(now, addr, want.intersect(needed), false);
            needed = needed.minus(want);
        }
    }

    /// Where candidate `c` comes among the members to ask for clubs (`from_peers`: what
    /// peers may be asked for), lowest first; `None`: not worth asking.
    pub(super) fn source_rank(
        &self,
        now: Timestamp,
        c: &Candidate,
        from_peers: ClubMask,
    ) -> Option<u8> {
        // Peers the tracker listed with free seats first: the others are likely full.
        let full = u8::from(!c.free_seats || c.demoted_until > now);
        Some(match c.role {
            Role::Relay => 0,
            Role::Publisher => 1,
            Role::Peer if from_peers.contains(c.club) && c.club != self.club => 2 + full,
            // A member of our own club that the mates do not reach: any member of the club
            // can push it to us like to an outside member.
            Role::Peer if from_peers.contains(c.club) => 4 + full,
            Role::Peer => return None,
        })
    }

    /// Clubs a peer upstream gives us.
    fn clubs_from_peers(&self) -> ClubMask {
        self.links
            .values()
            .filter(|l| l.role == Role::Peer && !l.mate)
            .fold(ClubMask::NONE, |m, l| m.union(l.recv).union(l.wanted))
    }

    /// Relay: ends the links to peers that give it only clubs the publisher or another relay
    /// now gives it (their pieces come a hop later, and cost their upload).
    pub(super) fn drop_covered_peer_sources(&mut self) {
        if self.config.role != Role::Relay {
            return;
        }
        let seeded = self
            .links
            .values()
            .filter(|l| l.role != Role::Peer && l.established && !l.mate)
            .fold(ClubMask::NONE, |m, l| m.union(l.recv));
        let covered = self.links_where(|l| {
            l.role == Role::Peer
                && l.initiated
                && !l.mate
                && !l.wanted.is_empty()
                && l.wanted.minus(seeded).is_empty()
        });
        for &addr in &covered {
            self.stop_receiving(addr);
        }
        self.give_back(covered);
    }

    /// Asks upstreams that can give more than they do (a relay; the publisher, to a relay)
    /// for clubs in `needed`, on the link we hold: a new link would need a free downstream
    /// slot there, and a member that holds one for some clubs would otherwise never get the
    /// others from it. What is still needed.
    fn widen_upstreams(&mut self, now: Timestamp, mut needed: ClubMask) -> ClubMask {
        let mut asks = Vec::new();
        for (addr, l) in &self.links {
            // (A peer gives only its own club, which it gives already.)
            if !l.initiated || !l.established || l.mate || now < l.widen_at {
                continue;
            }
            let more = needed
                .intersect(self.clubs_given_by(l.role, l.club))
                .minus(l.recv);
            if !more.is_empty() || l.wanted != l.recv {
                needed = needed.minus(more);
                asks.push((*addr, more));
            }
        }
        for (addr, more) in asks {
            let Some(l) = self.links.get_mut(&addr) else {
                continue;
            };
            // An earlier ask that went unanswered lapses here.
            l.wanted = l.recv.union(more);
            if more.is_empty() {
                continue;
            }
            l.widen_at = now + UNANSWERED_JOIN;
            let cookie = l.cookie;
            let join = self.join_for(now, addr, cookie);
            self.send_control(addr, |b| join.encode(b));
            self.stats.joins_sent += 1;
        }
        needed
    }

    /// Where NACKs for `club` go, best first: the club's sources, upstreams and seeds (which
    /// had the piece pushed to them) before mates (which may have missed it as we did); with
    /// `wide` (from the third try, or at once for a club with no source), then any member we
    /// are linked with: every member receives every club, so most have it. Each comes with
    /// its [`Link::repair_score`].
    fn nack_sources(&self, club: u8, wide: bool) -> Vec<(SocketAddr, f32)> {
        let mut sources: Vec<(u8, SocketAddr, f32)> = self
            .links
            .iter()
            .filter(|(_, l)| l.established || !l.initiated)
            .filter_map(|(a, l)| {
                let rank = match (l.is_source_of(club), l.mate) {
                    (true, false) => 0,
                    (true, true) => 1,
                    _ if wide => 2,
                    _ => return None,
                };
                Some((rank, *a, l.repair_score()))
            })
            .collect();
        sources.sort_unstable_by_key(|x| (x.0, x.1));
        sources.into_iter().map(|(_, a, y)| (a, y)).collect()
    }

    /// Sends a JOIN asking `addr` for `want` (or to be a mate).
    pub(super) fn ask(&mut self, now: Timestamp, addr: SocketAddr, want: ClubMask, mate: bool) {
        let c = self.candidates[&addr];
        let unit = self.unit_bytes();
        let l = self
            .links
            .get_or_insert_with(addr, || Link::new(now, c.role, c.club, true, unit));
        l.initiated = true;
        l.established = false;
        l.wanted = want;
        l.wants_mate = mate;
        l.last_join = now;
        // The answer is awaited from now, also on a link that existed already (a member that
        // takes our club and is now asked for its own): its last answer may be long past.
        l.last_keepalive = now;
        let join = self.join_for(now, addr, CookieBytes::default());
        tracing::trace!(to = %addr, club = c.club, want = want.0, mate, free_seats = c.free_seats, "asking");
        self.send_control(addr, |b| join.encode(b));
        self.stats.joins_sent += 1;
    }

    /// NACKs gaps that waited out the reordering delay, to a source of their club.
    pub(super) fn send_nacks(&mut self, now: Timestamp) {
        let k = u64::from(self.k());
        let deadline = self.config.repair_horizon;
        let mut by_target: BTreeMap<SocketAddr, Vec<u64>> = BTreeMap::new();
        let mut give_up = Vec::new();
        let seqs: Vec<u64> = self
            .missing
            .iter()
            .filter(|(_, m)| m.next_nack <= now)
            .map(|(s, _)| *s)
            .collect();
        if seqs.is_empty() {
            return;
        }
        // Where each club's NACKs go, worked out once per club (and per kind of try).
        let mut sources_by_club: Vec<Option<Vec<(SocketAddr, f32)>>> = vec![None; k as usize * 2];
        // The publisher, if it seeds us, and the clubs it seeds us.
        let publisher = self
            .links
            .iter()
            .find(|(_, l)| l.role == Role::Publisher && l.established)
            .map(|(a, l)| (*a, l.recv));
        for seq in seqs {
            let m = self.missing[&seq];
            // Asked until it can no longer play (no member would resend it then), and
            // never longer than the horizon after it was noticed.
            let too_late = self
                .lateness_of_missing(now, seq)
                .is_some_and(|late| late > deadline);
            if m.tries >= MAX_NACKS || now.saturating_since(m.noticed) > deadline || too_late {
                give_up.push(seq);
                continue;
            }
            let club = (seq % k) as u8;
            // A club with no source here (it left, or we replaced it) goes wide at once: its
            // gaps would otherwise wait, unasked, until a new source came.
            let mut wide = m.tries >= WIDE_FROM_TRY;
            if !wide {
                let narrow = sources_by_club[usize::from(club) * 2]
                    .get_or_insert_with(|| self.nack_sources(club, false));
                wide = narrow.is_empty();
            }
            let sources = sources_by_club[usize::from(club) * 2 + usize::from(wide)]
                .get_or_insert_with(|| self.nack_sources(club, wide));
            let seeder = publisher
                .filter(|(_, clubs)| clubs.contains(club))
                .map(|(a, _)| a);
            let Some(target) = nack_target(sources, seeder, m.tries, wide, seq) else {
                continue;
            };
            let rtt = self
                .links
                .get(&target)
                .map_or(Duration::from_millis(100), |l| l.srtt);
            by_target.entry(target).or_default().push(seq);
            if let Some(e) = self.missing.get_mut(&seq) {
                e.blamed.get_or_insert(target);
                e.tries += 1;
                e.next_nack =
                    now + (rtt * 2).clamp(Duration::from_millis(80), Duration::from_millis(250));
            }
        }
        for seq in give_up {
            tracing::trace!(seq, "repair given up");
            if let Some(b) = self.missing.remove(&seq).and_then(|m| m.blamed) {
                if let Some(l) = self.links.get_mut(&b) {
                    l.pieces_missed += 1;
                }
            }
            self.stats.repairs_given_up += 1;
        }
        let window = self.ack_window();
        for (to, mut seqs) in by_target {
            if let Some(l) = self.links.get_mut(&to) {
                l.acks_until = now + window; // its repairs follow
                l.note_nacked(seqs.len() as u32);
            }
            seqs.sort_unstable();
            let mut i = 0;
            while i < seqs.len() {
                let base = seqs[i];
                let mut missing = 0u64;
                while i < seqs.len() && seqs[i] - base < 64 {
                    missing |= 1 << (seqs[i] - base);
                    i += 1;
                }
                let nack = Nack {
                    channel: self.channel,
                    base,
                    missing,
                };
                self.stats.repairs_asked += u64::from(missing.count_ones());
                tracing::trace!(%to, base, missing, "NACK");
                self.send_control(to, |b| nack.encode(b));
            }
        }
    }

    /// Leaves: tells linked members and the tracker. Nothing more is sent after the datagrams
    /// this queues.
    pub fn leave(&mut self, now: Timestamp) {
        let addrs: Vec<SocketAddr> = self.links.keys().copied().collect();
        for a in addrs {
            // Only links we asked for carry the other side's cookie; the members we push to
            // notice our silence and find another upstream.
            if let Some(l) = self.links.get(&a).filter(|l| l.initiated) {
                let mut j = self.join_for_link(l, l.cookie);
                j.leaving = true;
                j.departing = true;
                self.send_control(a, |b| j.encode(b));
            }
        }
        self.links.clear();
        self.backlogged.clear();
        self.urgent.clear();
        self.live.clear();
        self.delayed.clear();
        if let Some(t) = &self.tracker {
            if let Some(cookie) = t.cookie {
                let a = TrackerAnnounce {
                    channel: self.channel,
                    cookie,
                    role: self.config.role,
                    club: self.club,
                    upload_kbps: 0,
                    free_seats: 0,
                    needs: ClubMask::NONE,
                    leaving: true,
                };
                let addr = t.addr;
                self.send_control(addr, |b| a.encode(b));
            }
        }
        self.leaving = true;
        let _ = now;
    }
}

/// Why an upstream is replaced.
#[derive(Debug, Clone, Copy)]
enum UpstreamFault {
    /// A club it sends has not arrived for a while, or it has sent nothing at all.
    Silent,
    /// It misses most of what it should send.
    Lossy,
    /// Its pieces trail the fastest path.
    Slow,
}

/// The member asked on try `tries` for piece `seq` from `sources` (best first, each with its
/// [`Link::repair_score`]; `wide`: the wide list, from try [`WIDE_FROM_TRY`] or for a club
/// with no source). The first tries go to the club's sources in turn. Wide tries go to the
/// member that says it has the most upload free: a source whose seats fill its uplink lets
/// repairs go stale in its queue while other members' upload sits idle (asking the linked
/// members in turn, `loss-churn` lost 1.6 % of its pieces; choosing the one that answered
/// most among three in a row, 1.4 %; the one with the most upload free, 0.9 %). Members that
/// claim room and leave what we ask unanswered score below all others. Ties go to the first
/// from a place that depends on the piece and the try: starting every piece's turn at the
/// head of the list (in address order) sent most members' wide NACKs to the same few early
/// joiners. The third try goes to the publisher if it seeds us that club: a piece that every
/// seed of its club lost exists only there, and a turn through a wide list asked it once in
/// ten tries. (Asking any upstream again there instead multiplied the repairs given up behind
/// a relay by eight.)
fn nack_target(
    sources: &[(SocketAddr, f32)],
    publisher: Option<SocketAddr>,
    tries: u32,
    wide: bool,
    seq: u64,
) -> Option<SocketAddr> {
    let n = sources.len() as u64;
    match publisher {
        Some(p) if tries == 2 && sources.iter().any(|(a, _)| *a == p) => Some(p),
        _ if n == 0 => None,
        _ if !wide => Some(sources[(u64::from(tries) % n) as usize].0),
        _ => {
            // Spread ties over the list (a multiplicative hash of the sequence).
            let start = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) + u64::from(tries);
            let mut best = sources[(start % n) as usize];
            for i in 1..n {
                let s = sources[((start + i) % n) as usize];
                if s.1 > best.1 {
                    best = s;
                }
            }
            Some(best.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn at(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 7000))
    }

    fn even(addrs: &[SocketAddr]) -> Vec<(SocketAddr, f32)> {
        addrs.iter().map(|a| (*a, 0.5)).collect()
    }

    #[test]
    fn the_publisher_is_asked_again_on_the_third_try() {
        // The first tries go to the club's sources in turn (here the publisher, which seeds
        // us, then a mate).
        let narrow = even(&[at(1), at(2)]);
        let publisher = Some(at(1));
        assert_eq!(nack_target(&narrow, publisher, 0, false, 7), Some(at(1)));
        assert_eq!(nack_target(&narrow, publisher, 1, false, 7), Some(at(2)));
        // The third try goes back to the publisher, whatever the piece.
        let wide = even(&[at(1), at(2), at(3), at(4), at(5)]);
        for seq in 0..50 {
            assert_eq!(nack_target(&wide, publisher, 2, true, seq), Some(at(1)));
        }
        // An unlinked publisher is not asked; nothing to ask, nothing asked.
        assert_ne!(nack_target(&wide, Some(at(9)), 2, true, 7), Some(at(9)));
        assert_eq!(nack_target(&[], publisher, 3, true, 7), None);
    }

    #[test]
    fn wide_tries_among_equals_go_round_the_list_from_a_place_that_depends_on_the_piece() {
        let wide = even(&(1..=8).map(at).collect::<Vec<_>>());
        // One piece's tries visit every member in turn.
        let asked: BTreeSet<SocketAddr> = (WIDE_FROM_TRY..WIDE_FROM_TRY + 8)
            .map(|n| nack_target(&wide, None, n, true, 42).unwrap())
            .collect();
        assert_eq!(asked.len(), wide.len());
        // Different pieces' first wide tries spread over the list instead of all going to its
        // head: over 800 pieces, every member gets between half and twice its share.
        let mut asked = [0u32; 8];
        for seq in 0..800 {
            let to = nack_target(&wide, None, WIDE_FROM_TRY, true, seq).unwrap();
            asked[wide.iter().position(|(a, _)| *a == to).unwrap()] += 1;
        }
        assert!(asked.iter().all(|n| (50..=200).contains(n)), "{asked:?}");
    }

    #[test]
    fn wide_tries_go_to_the_member_with_upload_free_unless_it_does_not_answer() {
        let mut full = Link::new(Timestamp::ZERO, Role::Peer, 0, true, 1000);
        full.spare = 10;
        let mut roomy = Link::new(Timestamp::ZERO, Role::Peer, 0, true, 1000);
        roomy.spare = 200;
        let mut unknown = Link::new(Timestamp::ZERO, Role::Peer, 0, true, 1000);
        unknown.spare = 120;
        let sources = |l: &Link| {
            vec![
                (at(1), full.repair_score()),
                (at(2), l.repair_score()),
                (at(3), unknown.repair_score()),
            ]
        };
        for seq in 0..100 {
            assert_eq!(
                nack_target(&sources(&roomy), None, 3, true, seq),
                Some(at(2))
            );
        }
        // A club with no source: its first try goes wide too.
        assert_eq!(nack_target(&sources(&roomy), None, 0, true, 5), Some(at(2)));
        // It claims room but answers nothing of twenty asked: the others come first.
        roomy.note_nacked(20);
        assert!(roomy.repair_score() < 0.0);
        for seq in 0..100 {
            assert_eq!(
                nack_target(&sources(&roomy), None, 3, true, seq),
                Some(at(3))
            );
        }
        // Answering brings it back.
        (0..18).for_each(|_| roomy.note_answered());
        assert_eq!(nack_target(&sources(&roomy), None, 3, true, 9), Some(at(2)));
    }
}
