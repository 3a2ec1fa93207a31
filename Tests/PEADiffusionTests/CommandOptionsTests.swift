import PEADiffusion
import XCTest

/// The declarative option machinery: one declaration gives the parser's table, the typed reads with their
/// checks, and the help rows.
final class CommandOptionsTests: XCTestCase {
    static let steps = CommandOption.value("--steps", "N", default: "30", .range(1...1000), help: "denoising steps")
    static let guidance = CommandOption.value("--guidance", "G", default: "7.5", help: "guidance scale",
                                              defaultNote: "; ≤ 1 turns guidance off")
    static let scheduler = CommandOption.value("--scheduler", "NAME", .choices(SchedulerName.allCases.map(\.rawValue)),
                                               help: "the scheduler")
    static let seed = CommandOption.value("--seed", "N", help: "seed")
    static let prompt = CommandOption.repeatable("--prompt", "TEXT", help: "a prompt (repeatable)")
    static let json = CommandOption.flag("--json", help: "print JSON")
    static let width = CommandOption.value("--width", "W", help: "image size", label: "--width W --height H")
    static let height = CommandOption.value("--height", "H", help: nil)
    static let spec = CommandSpec(name: "demo", usage: ["pea demo --steps N [options]", "pea demo --json"],
                                  description: "Does a demo.",
                                  groups: [.init("Options", [steps, guidance, scheduler, seed, prompt, json, width, height])],
                                  epilogue: "The end.")

    func usageError(_ arguments: [String]) -> String? {
        do {
            let options = try Self.spec.parse(arguments)
            _ = try options.int(Self.steps)
            _ = try options.double(Self.guidance)
            _ = try options.optionalString(Self.scheduler)
            _ = try options.string(Self.seed)
            return nil
        } catch PEAError.usage(let message) {
            return message
        } catch {
            return "not a usage error: \(error)"
        }
    }

    func testTypedReadsAndDefaults() throws {
        let options = try Self.spec.parse(["--steps", "12", "--prompt", "a", "--prompt=b", "--json", "--seed=7"])
        XCTAssertEqual(try options.int(Self.steps), 12)
        XCTAssertEqual(try options.double(Self.guidance), 7.5)   // the declared default
        XCTAssertNil(try options.optionalString(Self.scheduler))
        XCTAssertNil(try options.optionalInt(Self.width))
        XCTAssertEqual(try options.int(Self.seed), 7)
        XCTAssertEqual(options.strings(Self.prompt), ["a", "b"])
        XCTAssertTrue(options.has(Self.json))
        XCTAssertFalse(options.has(Self.guidance))   // a default is not "given"
        XCTAssertEqual(try Self.spec.parse([]).int(Self.steps), 30)
    }

    func testUsageErrorsNameTheOption() {
        XCTAssertEqual(usageError(["--bogus"]), "demo: unknown option '--bogus' (see 'pea demo --help')")
        XCTAssertEqual(usageError(["stray"]), "demo: unexpected argument 'stray' (see 'pea demo --help')")
        XCTAssertEqual(usageError(["--steps", "2", "--steps", "3"]), "demo: option '--steps' given more than once")
        XCTAssertEqual(usageError(["--steps"]), "demo: option '--steps' needs a value")
        XCTAssertEqual(usageError(["--json=1"]), "demo: option '--json' takes no value")
        XCTAssertEqual(usageError(["--steps", "0"]), "demo: option '--steps' must be in 1...1000, got 0")
        XCTAssertEqual(usageError(["--steps", "x"]), "demo: option '--steps' expects an integer, got 'x'")
        XCTAssertEqual(usageError(["--guidance", "nan"]), "demo: option '--guidance' expects a number, got 'nan'")
        XCTAssertEqual(usageError(["--scheduler", "fast"]),
                       "demo: --scheduler must be one of ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, pndm, got 'fast'")
        XCTAssertEqual(usageError([]), "demo: option '--seed' is required")
        XCTAssertNil(usageError(["--seed", "1", "--scheduler", "euler-a"]))
    }

    func testChoicesComeFromTheSchedulerEnum() throws {
        for name in SchedulerName.allCases {
            XCTAssertEqual(try Self.spec.parse(["--scheduler", name.rawValue]).optionalString(Self.scheduler), name.rawValue)
        }
    }

    func testPositionals() throws {
        let options = try ParsedOptions(["a.png", "--json", "b.png", "-"], command: "classify", options: [Self.json],
                                        positionals: true)
        XCTAssertEqual(options.positionals, ["a.png", "b.png", "-"])
        XCTAssertTrue(options.has(Self.json))
    }

    func testHelpIsWrittenFromTheDeclarations() {
        let help = Self.spec.help
        XCTAssertEqual(help, """
            Usage: pea demo --steps N [options]
                   pea demo --json

            Does a demo.

            Options:
              --steps N                 denoising steps (default 30)
              --guidance G              guidance scale (default 7.5; ≤ 1 turns guidance off)
              --scheduler NAME          the scheduler
              --seed N                  seed
              --prompt TEXT             a prompt (repeatable)
              --json                    print JSON
              --width W --height H      image size

            The end.
            """)
    }

    func testLongHelpWrapsAtTheHelpColumn() {
        let option = CommandOption.value("--a-rather-long-option-name", "VALUE", help: String(repeating: "word ", count: 40))
        let rows = CommandSpec(name: "x", usage: ["pea x"], groups: [.init("Options", [option])]).help
            .split(separator: "\n").drop { !$0.hasPrefix("  --") }
        XCTAssertTrue(rows.first?.hasPrefix("  --a-rather-long-option-name VALUE  word word") ?? false, "\(rows)")
        XCTAssertGreaterThan(rows.count, 1)
        for row in rows {
            XCTAssertLessThanOrEqual(row.count, 118, String(row))
        }
        for row in rows.dropFirst() {
            XCTAssertTrue(row.hasPrefix(String(repeating: " ", count: 28) + "word"), String(row))
        }
    }

    func testBackendSelectionOnTheCPU() throws {
        let cpu = try BackendSelection(.cpu, precision: .fp32, threads: 1)
        XCTAssertEqual(cpu.backend.name, "cpu")
        XCTAssertEqual(cpu.dtype, .f32)
        XCTAssertNil(cpu.fallbackNotice)
        XCTAssertThrowsError(try BackendSelection(.cpu, precision: .bf16, threads: 1)) { error in
            guard case BackendSelection.Failure.cpuComputesInFP32(let requested)? = error as? BackendSelection.Failure else {
                return XCTFail("\(error)")
            }
            XCTAssertEqual(requested, .bf16)
            XCTAssertFalse("\(error)".contains("--"), "the library names no flags: \(error)")
        }
    }
}
