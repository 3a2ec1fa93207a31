/// Command-line options declared once. A command lists its `CommandOption`s in a `CommandSpec`; the parser
/// accepts exactly those, `--help` is written from them, and the typed reads validate values against them, so
/// an unknown or repeated flag, a missing value or a value out of range is a usage error that names the flag.

/// One option: its name, how it takes a value, its default, its help and what a value must be.
public struct CommandOption: Sendable {
    public enum Kind: Sendable {
        /// `--name VALUE` or `--name=VALUE`, at most once.
        case value
        /// `--name`, no value, at most once.
        case flag
        /// `--name VALUE`, any number of times.
        case repeatable
    }

    /// What a value must be; checked when the value is read.
    public enum Check: Sendable {
        case none
        case range(ClosedRange<Int>)
        case choices([String])
    }

    /// With its dashes: "--steps".
    public let name: String
    /// What the value is in help and usage text: "N", "DIR", "auto|cpu|cuda"; empty for a flag.
    public let placeholder: String
    public let kind: Kind
    /// The value used when the option is not given, as it would be typed; shown in the help.
    public let defaultValue: String?
    /// Said after the default in the help, with its separator: "; ≤ 1 turns guidance off" gives
    /// "(default 7.5; ≤ 1 turns guidance off)".
    public let defaultNote: String?
    public let check: Check
    /// The help text, one paragraph (wrapped when printed); nil keeps the option out of the option list
    /// (another option's row or the command's description says what it does).
    public let help: String?
    /// The row's label in the option list when it is not "--name PLACEHOLDER" ("--width W --height H").
    public let label: String?

    public static func value(_ name: String, _ placeholder: String, default defaultValue: String? = nil,
                             _ check: Check = .none, help: String?, defaultNote: String? = nil, label: String? = nil) -> CommandOption {
        CommandOption(name: name, placeholder: placeholder, kind: .value, defaultValue: defaultValue,
                      defaultNote: defaultNote, check: check, help: help, label: label)
    }

    public static func flag(_ name: String, help: String?, label: String? = nil) -> CommandOption {
        CommandOption(name: name, placeholder: "", kind: .flag, defaultValue: nil, defaultNote: nil, check: .none,
                      help: help, label: label)
    }

    public static func repeatable(_ name: String, _ placeholder: String, help: String?, label: String? = nil) -> CommandOption {
        CommandOption(name: name, placeholder: placeholder, kind: .repeatable, defaultValue: nil, defaultNote: nil,
                      check: .none, help: help, label: label)
    }

    /// The row's label: "--steps N", "--json".
    public var rowLabel: String { label ?? (placeholder.isEmpty ? name : "\(name) \(placeholder)") }

    /// The help with the default appended, as the option list prints it.
    public var fullHelp: String? {
        guard let help else { return nil }
        guard let defaultValue else { return help }
        return "\(help) (default \(defaultValue)\(defaultNote ?? ""))"
    }
}

/// The options a command was given, read through their declarations.
public struct ParsedOptions {
    /// How errors name the command: "generate", "bench gemm".
    public let command: String
    /// The arguments that are not options, in order (only for commands that take them).
    public private(set) var positionals: [String] = []
    private var values: [String: [String]] = [:]

    /// Parses `--name value`, `--name=value` and `--flag` against `options`; other arguments are positionals
    /// where `positionals` allows them, else usage errors.
    public init(_ arguments: [String], command: String, options: [CommandOption], positionals allowsPositionals: Bool = false) throws {
        self.command = command
        var declared: [String: CommandOption] = [:]
        for option in options { declared[option.name] = option }
        var index = 0
        while index < arguments.count {
            var name = arguments[index]
            var inlineValue: String?
            if let equals = name.firstIndex(of: "="), name.hasPrefix("--") {
                inlineValue = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            guard let option = declared[name] else {
                if name.hasPrefix("-") && name != "-" {
                    throw PEAError.usage("\(command): unknown option '\(name)' (see 'pea \(command) --help')")
                }
                guard allowsPositionals else {
                    throw PEAError.usage("\(command): unexpected argument '\(name)' (see 'pea \(command) --help')")
                }
                positionals.append(arguments[index])
                index += 1
                continue
            }
            if option.kind != .repeatable, values[name] != nil {
                throw PEAError.usage("\(command): option '\(name)' given more than once")
            }
            switch option.kind {
            case .flag:
                if inlineValue != nil { throw PEAError.usage("\(command): option '\(name)' takes no value") }
                values[name, default: []].append("")
            case .value, .repeatable:
                if let inlineValue {
                    values[name, default: []].append(inlineValue)
                } else {
                    index += 1
                    guard index < arguments.count else {
                        throw PEAError.usage("\(command): option '\(name)' needs a value")
                    }
                    values[name, default: []].append(arguments[index])
                }
            }
            index += 1
        }
    }

    /// Whether the option was given (a flag is set).
    public func has(_ option: CommandOption) -> Bool { values[option.name] != nil }

    /// Every value of a repeatable option, in order.
    public func strings(_ option: CommandOption) -> [String] { values[option.name] ?? [] }

    /// The given value, else the declared default, else nil; a `.choices` option's value is checked.
    public func optionalString(_ option: CommandOption) throws -> String? {
        guard let text = values[option.name]?.last ?? option.defaultValue else { return nil }
        if case .choices(let choices) = option.check, !choices.contains(text) {
            throw PEAError.usage("\(command): \(option.name) must be one of \(choices.joined(separator: ", ")), got '\(text)'")
        }
        return text
    }

    /// The given value or the declared default; without either, the option is required.
    public func string(_ option: CommandOption) throws -> String {
        try required(option, optionalString(option))
    }

    /// The value as an integer within the declared range, or nil when neither given nor defaulted.
    public func optionalInt(_ option: CommandOption) throws -> Int? {
        guard let value = try converted(option, expecting: "an integer", Int.init) else { return nil }
        if case .range(let range) = option.check, !range.contains(value) {
            throw PEAError.usage("\(command): option '\(option.name)' must be in \(range.lowerBound)...\(range.upperBound), got \(value)")
        }
        return value
    }

    public func int(_ option: CommandOption) throws -> Int {
        try required(option, optionalInt(option))
    }

    /// The value as a finite number, or nil when neither given nor defaulted.
    public func optionalDouble(_ option: CommandOption) throws -> Double? {
        try converted(option, expecting: "a number") { Double($0).flatMap { $0.isFinite ? $0 : nil } }
    }

    public func double(_ option: CommandOption) throws -> Double {
        try required(option, optionalDouble(option))
    }

    /// The value as a number that is finite as the float32 it is used as (1e300 is a finite Double and an
    /// infinite Float), or nil when neither given nor defaulted.
    public func optionalFloat(_ option: CommandOption) throws -> Float? {
        try converted(option, expecting: "a number finite in float32") { Double($0).map(Float.init).flatMap { $0.isFinite ? $0 : nil } }
    }

    public func float(_ option: CommandOption) throws -> Float {
        try required(option, optionalFloat(option))
    }

    /// The value through `convert`; nil when there is no value, a usage error when `convert` refuses it.
    private func converted<T>(_ option: CommandOption, expecting kind: String, _ convert: (String) -> T?) throws -> T? {
        guard let text = try optionalString(option) else { return nil }
        guard let value = convert(text) else {
            throw PEAError.usage("\(command): option '\(option.name)' expects \(kind), got '\(text)'")
        }
        return value
    }

    private func required<T>(_ option: CommandOption, _ value: T?) throws -> T {
        guard let value else { throw PEAError.usage("\(command): option '\(option.name)' is required") }
        return value
    }
}

/// A command's declaration: its usage lines, what it does, its options in titled groups and closing text.
/// The parser's table and the `--help` text both come from it.
public struct CommandSpec: Sendable {
    /// Options under one title ("Options", "Validation (samples from the adapter as it trains)"); a note
    /// (already formatted) may follow the rows.
    public struct Group: Sendable {
        public let title: String
        public let options: [CommandOption]
        public let note: String?

        public init(_ title: String, _ options: [CommandOption], note: String? = nil) {
            self.title = title
            self.options = options
            self.note = note
        }
    }

    /// How errors and `--help` name it: "generate", "bench gemm".
    public let name: String
    /// Usage lines, each without the "Usage: " in front.
    public let usage: [String]
    /// Formatted text between the usage lines and the options.
    public let description: String?
    public let groups: [Group]
    /// Formatted text after the options.
    public let epilogue: String?
    public let takesPositionals: Bool

    public init(name: String, usage: [String], description: String? = nil, groups: [Group], epilogue: String? = nil,
                takesPositionals: Bool = false) {
        self.name = name
        self.usage = usage
        self.description = description
        self.groups = groups
        self.epilogue = epilogue
        self.takesPositionals = takesPositionals
    }

    public var options: [CommandOption] { groups.flatMap(\.options) }

    public func parse(_ arguments: [String]) throws -> ParsedOptions {
        try ParsedOptions(arguments, command: name, options: options, positionals: takesPositionals)
    }

    /// `--help` or `-h` anywhere in the arguments asks for the help instead of a run.
    public static func asksForHelp(_ arguments: [String]) -> Bool {
        arguments.contains("--help") || arguments.contains("-h")
    }

    /// The `--help` text.
    public var help: String {
        var parts = [usage.enumerated().map { ($0.offset == 0 ? "Usage: " : "       ") + $0.element }.joined(separator: "\n")]
        if let description { parts.append(description) }
        for group in groups {
            var lines = ["\(group.title):"]
            for option in group.options { lines += Self.row(option) }
            if let note = group.note { lines.append(note) }
            parts.append(lines.joined(separator: "\n"))
        }
        if let epilogue { parts.append(epilogue) }
        return parts.joined(separator: "\n\n")
    }

    /// Option rows: the label at column 2, the help from column 28 (after the label when it is wider),
    /// wrapped at `width` characters.
    static let helpColumn = 28
    static let width = 118

    static func row(_ option: CommandOption) -> [String] {
        guard let help = option.fullHelp else { return [] }
        let label = "  " + option.rowLabel
        let first = label.count + 2 <= helpColumn ? label + String(repeating: " ", count: helpColumn - label.count) : label + "  "
        return wrapped(help, firstLine: first, indent: String(repeating: " ", count: helpColumn))
    }

    /// `text`'s words filled into lines of at most `width` characters, the first after `firstLine`, the others
    /// after `indent` (a word longer than a line gets a line of its own).
    static func wrapped(_ text: String, firstLine: String, indent: String) -> [String] {
        var lines: [String] = []
        var line = firstLine, lineHasWord = false
        for word in text.split(separator: " ", omittingEmptySubsequences: true) {
            if lineHasWord && line.count + 1 + word.count > width {
                lines.append(line)
                line = indent
                lineHasWord = false
            }
            line += (lineHasWord ? " " : "") + word
            lineHasWord = true
        }
        lines.append(line)
        return lines
    }
}
