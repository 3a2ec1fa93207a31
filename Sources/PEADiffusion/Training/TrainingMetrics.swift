#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `OUTPUT/metrics.jsonl` of `pea train`: one JSON object per line and step,
///
///     {"grad_norm":…,"loss":…,"loss_features":…,"loss_logits":…,"loss_task":…,"lr":…,"seconds":…,"step":…}
///
/// plus `"validation": PATH` on a step that wrote a validation grid. Keys are sorted (the repo's JSON writer);
/// numbers are the shortest decimals that read back to the logged Float (or, for seconds, Double); a value that
/// is not finite (the gradient norm of an update skipped for f16 overflow, a diverged loss) is `null`. Each line
/// is flushed as it is written, so the file can be followed with `tail -f`.
///
/// The file describes one run: opening it for a run that starts after step s (0 for a fresh run, the checkpoint's
/// step on `--resume`) keeps only the lines with a step ≤ s (rewritten atomically) and drops the others, along
/// with anything that is not such a line (a line torn by a crash). The file's folder is created when missing.
public final class TrainingMetricsLog {
    public let path: String
    private var handle: UnsafeMutablePointer<FILE>?

    public init(path: String, startingAfter step: Int) throws {
        self.path = path
        try makeDirectories(parentFolder(path))
        var kept: [UInt8] = []
        if isRegularFile(path) {
            for line in try readWholeFile(path).split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: true) {
                guard let value = try? JSONValue.parse(Array(line)), let logged = value.objectValue?["step"]?.intValue,
                      logged <= step else { continue }
                kept += line
                kept.append(UInt8(ascii: "\n"))
            }
        }
        try writeFileAtomically(to: path) { append in try append(kept) }
        guard let handle = fopen(path, "a") else {
            throw PEAError.invalidFile(path: path, reason: "cannot open for appending: \(systemErrorMessage())")
        }
        self.handle = handle
    }

    deinit { close() }

    /// Closes the file (further appends are errors).
    public func close() {
        if let handle { fclose(handle) }
        handle = nil
    }

    /// The JSON line (without its newline) for one step's report.
    public static func line(_ report: TrainingStepReport, validation: String? = nil) -> String {
        func number(_ value: Float) -> JSONValue {
            // Through the Float's shortest decimal, so 1e-05 prints as 1e-05 and not as 9.999999747378752e-06.
            value.isFinite ? .number(Double(String(value)) ?? Double(value)) : .null
        }
        var members: [String: JSONValue] = [
            "step": .number(Double(report.step)),
            "loss": number(report.losses.total),
            "loss_task": number(report.losses.task),
            "loss_logits": number(report.losses.logits),
            "loss_features": number(report.losses.features),
            "lr": number(report.learningRate),
            "grad_norm": number(report.gradientNorm),
            "seconds": report.seconds.isFinite ? .number(report.seconds) : .null,
        ]
        if let validation { members["validation"] = .string(validation) }
        return JSONValue.object(members).serialized()
    }

    /// Appends and flushes the line for `report`.
    public func append(_ report: TrainingStepReport, validation: String? = nil) throws {
        guard let handle else { throw PEAError.invalidFile(path: path, reason: "the metrics log is closed") }
        let text = Self.line(report, validation: validation) + "\n"
        guard fputs(text, handle) >= 0, fflush(handle) == 0 else {
            throw PEAError.invalidFile(path: path, reason: "cannot write: \(systemErrorMessage())")
        }
    }
}
