//! What a swarm member counted: traffic by club, repairs, link changes, refusals.

/// Counters of one swarm member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwarmStats {
    /// Verified pieces new to this member.
    pub pieces_new: u64,
    /// Pieces it already had (the price of in-club push and of repair races).
    pub duplicates: u64,
    /// Of those, pieces pushed by club mates (in-club flooding).
    pub duplicates_from_mates: u64,
    /// Pieces that failed verification (each bans its sender).
    pub bad_pieces: u64,
    /// Pieces from addresses it has no link with (dropped unverified).
    pub unknown_sender: u64,
    /// Pieces older than the ring.
    pub stale: u64,
    /// Datagrams from banned members.
    pub from_banned: u64,
    /// Datagrams that did not parse.
    pub malformed: u64,
    /// Datagrams it did not expect.
    pub unexpected: u64,
    /// Piece bytes received, by club.
    pub download_by_club: Vec<u64>,
    /// Piece bytes sent, by club.
    pub upload_by_club: Vec<u64>,
    /// Control bytes sent.
    pub control_bytes_out: u64,
    /// Pieces sent from background queues (repair and catch-up).
    pub background_pieces_out: u64,
    /// Times a background piece waited for its link's LEDBAT window.
    pub background_blocked_window: u64,
    /// Times a background piece waited for the upload limit.
    pub background_blocked_upload: u64,
    /// Pieces asked for in NACKs.
    pub repairs_asked: u64,
    /// Gaps filled after a NACK.
    pub repaired: u64,
    /// Gaps given up on (too late to play).
    pub repairs_given_up: u64,
    /// NACKed pieces queued for resending to others.
    pub repairs_served: u64,
    /// NACKed pieces it no longer had, or had too long ago.
    pub repairs_unavailable: u64,
    /// NACKs from members it has no link with.
    pub nacks_ignored: u64,
    /// Pieces queued as catch-up for new links.
    pub catch_up_queued: u64,
    /// Live pieces dropped after waiting too long for upload.
    pub live_dropped: u64,
    /// Live pieces a link's congestion control refused.
    pub live_refused: u64,
    /// New pieces that arrived too far behind the fastest path to be pushed on as live.
    pub too_late_to_forward: u64,
    /// JOINs sent.
    pub joins_sent: u64,
    /// JOINs granted.
    pub joins_granted: u64,
    /// JOINs refused (no upload left).
    pub joins_refused: u64,
    /// JOINs from unproven addresses (answered with a COOKIE).
    pub joins_unproven: u64,
    /// Peer lists from the tracker.
    pub peer_lists: u64,
    /// Publisher: seeds rotated out to make room for a starving club member.
    pub seeds_rotated: u64,
    /// Links that timed out.
    pub links_expired: u64,
    /// Upstreams replaced for being silent, lossy or slow.
    pub peers_replaced: u64,
    /// Of those, replaced because a club fell silent.
    pub replaced_silent: u64,
    /// Of those, replaced for losing pieces.
    pub replaced_lossy: u64,
    /// Of those, replaced for trailing the fastest path.
    pub replaced_slow: u64,
    /// Members banned for a piece that failed verification.
    pub peers_banned: u64,
}

impl SwarmStats {
    /// Makes room for `k` clubs.
    pub fn resize(&mut self, k: usize) {
        self.download_by_club.resize(k, 0);
        self.upload_by_club.resize(k, 0);
    }

    /// Counts `bytes` of a piece of `club` received.
    pub fn add_download(&mut self, club: u8, bytes: u64) {
        if let Some(c) = self.download_by_club.get_mut(usize::from(club)) {
            *c += bytes;
        }
    }

    /// Counts `bytes` of a piece of `club` sent.
    pub fn add_upload(&mut self, club: u8, bytes: u64) {
        if let Some(c) = self.upload_by_club.get_mut(usize::from(club)) {
            *c += bytes;
        }
    }

    /// Adds `other`'s counts to these (members of several channels in one process).
    pub fn absorb(&mut self, other: &SwarmStats) {
        self.pieces_new += other.pieces_new;
        self.duplicates += other.duplicates;
        self.duplicates_from_mates += other.duplicates_from_mates;
        self.bad_pieces += other.bad_pieces;
        self.unknown_sender += other.unknown_sender;
        self.stale += other.stale;
        self.from_banned += other.from_banned;
        self.malformed += other.malformed;
        self.unexpected += other.unexpected;
        self.control_bytes_out += other.control_bytes_out;
        self.background_pieces_out += other.background_pieces_out;
        self.background_blocked_window += other.background_blocked_window;
        self.background_blocked_upload += other.background_blocked_upload;
        self.repairs_asked += other.repairs_asked;
        self.repaired += other.repaired;
        self.repairs_given_up += other.repairs_given_up;
        self.repairs_served += other.repairs_served;
        self.repairs_unavailable += other.repairs_unavailable;
        self.nacks_ignored += other.nacks_ignored;
        self.catch_up_queued += other.catch_up_queued;
        self.live_dropped += other.live_dropped;
        self.live_refused += other.live_refused;
        self.too_late_to_forward += other.too_late_to_forward;
        self.joins_sent += other.joins_sent;
        self.joins_granted += other.joins_granted;
        self.joins_refused += other.joins_refused;
        self.joins_unproven += other.joins_unproven;
        self.peer_lists += other.peer_lists;
        self.seeds_rotated += other.seeds_rotated;
        self.links_expired += other.links_expired;
        self.peers_replaced += other.peers_replaced;
        self.replaced_silent += other.replaced_silent;
        self.replaced_lossy += other.replaced_lossy;
        self.replaced_slow += other.replaced_slow;
        self.peers_banned += other.peers_banned;
        for (mine, theirs) in [
            (&mut self.download_by_club, &other.download_by_club),
            (&mut self.upload_by_club, &other.upload_by_club),
        ] {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += t;
            }
        }
    }

    /// Piece bytes sent in all.
    pub fn upload_bytes(&self) -> u64 {
        self.upload_by_club.iter().sum()
    }

    /// Piece bytes received in all.
    pub fn download_bytes(&self) -> u64 {
        self.download_by_club.iter().sum()
    }
}
