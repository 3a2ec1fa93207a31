import PEADiffusion

/// A command made of subcommands (`pea`, `pea bench`, `pea toyworld`): runs the one the first argument names with
/// the rest; `help`, `--help` or `-h` there prints `usage`; none or an unknown one is a usage error listing them.
struct Subcommands {
    /// "" for `pea` itself, else the command's name ("bench").
    let command: String
    let usage: String
    let table: KeyValuePairs<String, ([String]) throws -> Void>

    func run(_ arguments: [String]) throws {
        let what = command.isEmpty ? "command" : "subcommand"
        let prefix = command.isEmpty ? "" : "\(command): "
        let names = table.map(\.key).joined(separator: ", ")
        let help = command.isEmpty ? "pea --help" : "pea \(command) --help"
        guard let name = arguments.first else {
            print(usage)
            throw PEAError.usage("\(prefix)no \(what) given (one of: \(names))")
        }
        if ["help", "--help", "-h"].contains(name) {
            print(usage)
            return
        }
        guard let run = table.first(where: { $0.key == name })?.value else {
            throw PEAError.usage("\(prefix)unknown \(what) '\(name)' (one of: \(names); see '\(help)')")
        }
        try run(Array(arguments.dropFirst()))
    }
}
