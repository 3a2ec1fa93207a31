#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion
import Synchronization

/// The signal (SIGINT or SIGTERM) that asked `pea train` or a `pea generate` job to stop, 0 while none has.
private let stopSignal = Atomic<Int32>(0)

/// SIGINT and SIGTERM stop `pea train` between steps and a `pea generate` job between batches: the handler only
/// records the signal, and the loop, after the step or batch in progress, saves what it has and exits. The
/// handler resets itself, so a second signal stops the process at once (checkpoints and job files appear whole,
/// so that loses no saved state).
enum StopRequest {
    static func install() {
        stopSignal.store(0, ordering: .relaxed)   // initialises the global before a handler can touch it
        var action = sigaction()
        #if canImport(Glibc)
        action.__sigaction_handler.sa_handler = { stopSignal.store($0, ordering: .relaxed) }
        #else
        action.__sigaction_u.__sa_handler = { stopSignal.store($0, ordering: .relaxed) }
        #endif
        sigemptyset(&action.sa_mask)
        action.sa_flags = Int32(bitPattern: UInt32(SA_RESTART) | UInt32(SA_RESETHAND))
        for signal in [SIGINT, SIGTERM] { sigaction(signal, &action, nil) }
    }

    /// The signal received since `install`, if any.
    static var received: Int32? {
        let signal = stopSignal.load(ordering: .relaxed)
        return signal == 0 ? nil : signal
    }
}
