//! Command ids and the length of each command's reply (section 5).
//!
//! A leaf module: headers, requests and replies all need the command ids,
//! and keeping them apart from the request decoder is what keeps the codec
//! free of import cycles.

/// Command ids (section 5).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum Command {
    /// Opens the session: reply buffer, fault ring, signal area, profile.
    SessionInit = 0x0001,
    /// Ends the session.
    SessionDestroy = 0x0002,
    /// Reads the session's counters.
    DeviceQuery = 0x0003,
    /// Reads the session's user-queue counters (1.1).
    QueueCounters = 0x0004,
    /// Maps and unmaps ranges of the session's GPU VM.
    VmBind = 0x0010,
    /// Sets range attributes.
    RangeAttr = 0x0011,
    /// Creates a compute queue.
    QueueCreate = 0x0020,
    /// Destroys a compute queue.
    QueueDestroy = 0x0021,
    /// Queues a kernel launch.
    Dispatch = 0x0022,
    /// Creates a user-mode queue: a ring the device reads itself (1.1).
    UserQueueCreate = 0x0023,
    /// Destroys a user-mode queue (1.1).
    UserQueueDestroy = 0x0024,
    /// A hint: look at the session's doorbells now (1.1).
    DoorbellKick = 0x0025,
    /// Ends pending faults.
    FaultReply = 0x0030,
    /// Native profile: a fence held until an event is pending.
    EventArm = 0x0040,
    /// 1.1, kernel only: the guest kernel takes over the session's faults.
    SvmAttach = 0x0050,
    /// 1.1, kernel only: the guest kernel gives the faults back.
    SvmDetach = 0x0051,
}

impl Command {
    /// Parses a `cmd` field.
    pub const fn from_u32(cmd: u32) -> Option<Command> {
        Some(match cmd {
            0x0001 => Command::SessionInit,
            0x0002 => Command::SessionDestroy,
            0x0003 => Command::DeviceQuery,
            0x0004 => Command::QueueCounters,
            0x0010 => Command::VmBind,
            0x0011 => Command::RangeAttr,
            0x0020 => Command::QueueCreate,
            0x0021 => Command::QueueDestroy,
            0x0022 => Command::Dispatch,
            0x0023 => Command::UserQueueCreate,
            0x0024 => Command::UserQueueDestroy,
            0x0025 => Command::DoorbellKick,
            0x0030 => Command::FaultReply,
            0x0040 => Command::EventArm,
            0x0050 => Command::SvmAttach,
            0x0051 => Command::SvmDetach,
            _ => return None,
        })
    }

    /// The `cmd` field.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// Length of this command's reply, header included. `EVENT_ARM` has no
    /// reply; 16 is the length of the error reply to an `EVENT_ARM` that
    /// wrongly asked for one.
    pub const fn reply_len(self) -> u32 {
        match self {
            Command::SessionInit => 32,
            Command::DeviceQuery => 80,
            Command::QueueCounters => 48,
            Command::VmBind => 32,
            Command::QueueCreate | Command::UserQueueCreate => 24,
            Command::FaultReply => 24,
            Command::SvmAttach => 24,
            Command::SessionDestroy
            | Command::SvmDetach
            | Command::RangeAttr
            | Command::QueueDestroy
            | Command::Dispatch
            | Command::UserQueueDestroy
            | Command::DoorbellKick
            | Command::EventArm => 16,
        }
    }

    /// Whether a request of this command may ask for a reply.
    pub const fn has_reply(self) -> bool {
        !matches!(self, Command::EventArm)
    }
}

/// Length of the reply to a request with this `cmd`: the command's reply
/// length, or 16 (header only) for an undefined command.
pub const fn reply_len(cmd: u32) -> u32 {
    match Command::from_u32(cmd) {
        Some(c) => c.reply_len(),
        None => 16,
    }
}
